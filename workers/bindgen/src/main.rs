//! `dockside-workers-bindgen IN.wasm OUT_DIR`: wasm-bindgen's glue for the Cloudflare Worker,
//! as `wasm-bindgen --target module --out-name index --no-typescript
//! --experimental-reset-state-function --force-enable-abort-handler` writes it (the options
//! worker-build 0.8.7 uses), then the one edit worker-build makes: the Wasm module is imported
//! as a plain `import`, which wrangler's bundler turns into a compiled module, instead of
//! `import source`, which it does not read.
//! `workers/build.sh` runs it; `workers/entry.mjs` is the entry point that imports the result.

use std::path::PathBuf;

use anyhow::Context as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--version") {
        // The wasm-bindgen release it generates for, as `wasm-bindgen --version` says it.
        println!("wasm-bindgen {}", wasm_bindgen_shared::SCHEMA_VERSION);
        return ExitCode::SUCCESS;
    }
    let [input, out_dir] = args.as_slice() else {
        eprintln!("usage: dockside-workers-bindgen IN.wasm OUT_DIR");
        return ExitCode::from(2);
    };
    match run(input.into(), out_dir.into()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dockside-workers-bindgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(input: PathBuf, out_dir: PathBuf) -> anyhow::Result<()> {
    let mut b = wasm_bindgen_cli_support::Bindgen::new();
    b.module(true)?
        .input_path(&input)
        .out_name("index")
        .typescript(false)
        // A panic aborts the instance (panic = abort); the entry point then asks for a fresh
        // one through `__wbg_reset_state` rather than failing every later request.
        .reset_state_function(true)
        .force_enable_abort_handler(true);
    b.generate(&out_dir)
        .with_context(|| format!("generating the glue for {}", input.display()))?;
    let index = out_dir.join("index.js");
    let js = std::fs::read_to_string(&index).with_context(|| index.display().to_string())?;
    std::fs::write(&index, js.replace("import source ", "import "))
        .with_context(|| index.display().to_string())?;
    Ok(())
}
