// The Worker's entry point (`main` in wrangler.toml). The Rust code is in build/, written by
// workers/build.sh: wasm-bindgen's glue (index.js) and the Wasm module (index_bg.wasm).
// wrangler bundles this file with them. It only hands requests over: to the Worker's `fetch`
// (src/adapters/workers.rs) and to the Durable Object class `RegistryKeys`
// (src/hosts/durable.rs).
import { DurableObject, WorkerEntrypoint } from "cloudflare:workers";
import * as wasm from "../build/index.js";

// A Rust panic aborts the Wasm instance (panic = abort): its memory can no longer be trusted.
// workers-rs's panic hook marks the state shared with this file critical; the next request
// then starts a fresh instance (`__wbg_reset_state`, from wasm-bindgen's
// --experimental-reset-state-function) instead of failing until workerd drops the isolate.
const state = wasm.__worker_init_state();

function ready() {
  if (state.criticalError) {
    console.error("dockside: the Wasm instance aborted; starting a new one");
    wasm.__wbg_reset_state();
    state.criticalError = false;
    state.instanceId++;
  }
}

function failed(e) {
  if (e instanceof WebAssembly.RuntimeError) state.criticalError = true;
  throw e;
}

export default class extends WorkerEntrypoint {
  async fetch(request) {
    ready();
    try {
      return await wasm.fetch(request, this.env, this.ctx);
    } catch (e) {
      failed(e);
    }
  }
}

// The Rust object lives in the current Wasm instance; after a reset it is made again (its
// state is in the object's storage, not in Wasm memory).
export class RegistryKeys extends DurableObject {
  #keys = null;
  #instance = -1;

  async fetch(request) {
    ready();
    if (this.#instance !== state.instanceId) {
      this.#keys = new wasm.RegistryKeys(this.ctx, this.env);
      this.#instance = state.instanceId;
    }
    try {
      return await this.#keys.fetch(request);
    } catch (e) {
      failed(e);
    }
  }
}
