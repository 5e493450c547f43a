//! The interoperability suite: real clients (skopeo, crane, podman/buildah, docker, oras-py,
//! @sigstore/oci, the oci-client crate) push to and pull from a native `dockside serve` on a
//! free loopback port. `.ci/interop` installs the clients and runs this; see docs/INTEROP.md.
//!
//! Only with `--features interop`. A client that is not installed fails its test; name it in
//! `DOCKSIDE_INTEROP_SKIP` (e.g. `docker,podman`) to skip it, loudly, on a local run.
#![cfg(feature = "interop")]

mod interop;

#[path = "interop/skopeo.rs"]
mod skopeo;

#[path = "interop/crane.rs"]
mod crane;

#[path = "interop/oras.rs"]
mod oras;

#[path = "interop/sigstore.rs"]
mod sigstore;

#[path = "interop/oci_client.rs"]
mod oci_client;

#[path = "interop/docker.rs"]
mod docker;

#[path = "interop/podman.rs"]
mod podman;

#[path = "interop/tls.rs"]
mod tls;

#[path = "interop/mirror.rs"]
mod mirror;
