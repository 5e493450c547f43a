#!/usr/bin/env sh
# Builds the Cloudflare Worker into build/ (wrangler.toml's [build] command; .ci/workers runs it
# too): the crate for wasm32-unknown-unknown with the feature `workers`, then wasm-bindgen's glue
# by dockside-workers-bindgen (workers/bindgen: `cargo install --locked --path workers/bindgen`,
# or DOCKSIDE_WORKERS_BINDGEN=its path). wrangler bundles workers/entry.mjs with the result.
set -eu
cd "$(dirname "$0")/.."

bindgen="${DOCKSIDE_WORKERS_BINDGEN:-dockside-workers-bindgen}"
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print }' Cargo.lock)
have=$("$bindgen" --version 2>/dev/null) || {
  echo "workers/build.sh: cannot run $bindgen: cargo install --locked --path workers/bindgen" >&2
  exit 1
}
if [ "$have" != "wasm-bindgen $want" ]; then
  echo "workers/build.sh: $bindgen generates for $have, but Cargo.lock has wasm-bindgen $want:" \
    "pin workers/bindgen/Cargo.toml to it and install it again" >&2
  exit 1
fi

# WASM_BINDGEN_USE_JS_SYS: wasm-bindgen's macros then await JavaScript promises through js-sys,
# as worker-build builds workers-rs (an environment variable: cargo gives host proc-macros no
# --cfg when cross-compiling).
WASM_BINDGEN_USE_JS_SYS=1 cargo build --lib --release --target wasm32-unknown-unknown \
  --no-default-features --features workers
target="${CARGO_TARGET_DIR:-target}"
# Written beside, then swapped in: a failed run leaves the last build whole.
rm -rf "$target/workers-glue"
"$bindgen" "$target/wasm32-unknown-unknown/release/dockside.wasm" "$target/workers-glue"
rm -rf build
mv "$target/workers-glue" build
echo "workers/build.sh: build/index_bg.wasm, $(( $(wc -c <build/index_bg.wasm) / 1024 )) KiB" >&2
