//! Test content, generated here and never downloaded: random tar+gzip layers, an image config
//! whose `rootfs.diff_ids` match them, OCI image manifests, a multi-platform image index, and
//! OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/...`) that skopeo and the
//! other clients read.
//!
//! The tar writer emits POSIX ustar; the gzip writer emits deflate "stored" blocks (valid gzip
//! that every decompressor reads, with no compression library needed).

use std::path::Path;

use serde_json::{Value, json};

use super::sha256;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------------------------
// Randomness

/// xorshift64*: fast, seedable, good enough for test bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Seeded from the clock, the process id and a stack address: different on every run.
    pub fn from_entropy() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        let addr = &local as *const u8 as u64;
        Rng::new(t ^ (u64::from(std::process::id()) << 32) ^ addr.rotate_left(17))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        self.0 = s;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// tar, gzip

/// A ustar archive of regular files (mode 0644, uid/gid 0, a fixed mtime) and the directories
/// their paths need, ending in two zero blocks.
pub fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    for (path, data) in files {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for d in &parts[..parts.len() - 1] {
            prefix.push_str(d);
            prefix.push('/');
            if !dirs.contains(&prefix) {
                dirs.push(prefix.clone());
                tar_header(&mut out, &prefix, 0, b'5', 0o755);
            }
        }
        tar_header(&mut out, path, data.len() as u64, b'0', 0o644);
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

fn tar_header(out: &mut Vec<u8>, name: &str, size: u64, kind: u8, mode: u32) {
    assert!(name.len() < 100, "tar name too long: {name}");
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], off: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}", width = len - 1);
        h[off..off + len - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, 1_700_000_000);
    h[148..156].copy_from_slice(b"        ");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
}

/// CRC-32 (IEEE), as gzip needs.
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    let mut c = !0u32;
    for &b in data {
        c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// A gzip member holding `data` in deflate stored blocks.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = data.chunks(65_535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        out.push(u8::from(last));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

// ---------------------------------------------------------------------------------------------
// Images

/// A content-addressed blob and its descriptor fields.
#[derive(Clone)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_owned(),
            digest: sha256(&data),
            data,
        }
    }

    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }

    pub fn hex(&self) -> &str {
        self.digest.split_once(':').expect("alg:hex").1
    }
}

/// One single-platform image: its layers (tar+gzip), config, and OCI manifest.
#[derive(Clone)]
pub struct Image {
    pub layers: Vec<Blob>,
    /// The uncompressed tar of each layer (its digest is the config's diff_id).
    pub layer_tars: Vec<Vec<u8>>,
    pub config: Blob,
    pub manifest: Blob,
    pub os: String,
    pub arch: String,
}

impl Image {
    /// All blobs: the layers, the config, the manifest.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut v: Vec<&Blob> = self.layers.iter().collect();
        v.push(&self.config);
        v.push(&self.manifest);
        v
    }
}

/// A random layer: a tar of `files` files of random bytes (sizes up to `max_file` bytes) under
/// a directory named after `label`, gzip-compressed.
pub fn random_layer(rng: &mut Rng, label: &str, files: usize, max_file: usize) -> (Vec<u8>, Blob) {
    let contents: Vec<(String, Vec<u8>)> = (0..files)
        .map(|i| {
            let len = 1 + rng.below(max_file as u64) as usize;
            (format!("{label}/file-{i}.bin"), rng.bytes(len))
        })
        .collect();
    let mut entries: Vec<(&str, &[u8])> = contents
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    let stamp = format!("{:016x}\n", rng.next_u64());
    let stamp_path = format!("{label}/stamp");
    entries.push((&stamp_path, stamp.as_bytes()));
    let t = tar(&entries);
    let gz = gzip(&t);
    (t, Blob::new(OCI_LAYER_GZIP, gz))
}

/// A random image for `os`/`arch` with `layers` layers of a few random files each.
pub fn random_image(rng: &mut Rng, os: &str, arch: &str, layers: usize) -> Image {
    let mut blobs = Vec::new();
    let mut tars = Vec::new();
    for i in 0..layers {
        let (t, b) = random_layer(rng, &format!("layer{i}-{arch}"), 3, 48 * 1024);
        tars.push(t);
        blobs.push(b);
    }
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256(t)).collect();
    let history: Vec<Value> = (0..layers)
        .map(|i| json!({"created": "2024-01-01T00:00:00Z", "created_by": format!("dockside interop layer {i}")}))
        .collect();
    let config = json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": os,
        "config": {"Env": ["PATH=/"], "Cmd": ["/nothing"], "Labels": {"dockside.interop": format!("{:x}", rng.next_u64())}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let config = Blob::new(OCI_CONFIG, serde_json::to_vec(&config).expect("JSON"));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": blobs.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        "annotations": {"org.opencontainers.image.description": "dockside interop test image"},
    });
    let manifest = Blob::new(
        OCI_MANIFEST,
        serde_json::to_vec_pretty(&manifest).expect("JSON"),
    );
    Image {
        layers: blobs,
        layer_tars: tars,
        config,
        manifest,
        os: os.to_owned(),
        arch: arch.to_owned(),
    }
}

/// An OCI image index over `images`, each with its platform.
pub fn index_of(images: &[Image]) -> Blob {
    let manifests: Vec<Value> = images
        .iter()
        .map(|i| {
            let mut d = i.manifest.descriptor();
            d["platform"] = json!({"os": i.os, "architecture": i.arch});
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    Blob::new(OCI_INDEX, serde_json::to_vec_pretty(&index).expect("JSON"))
}

/// Writes an OCI image layout at `dir` holding `blobs`, whose `index.json` names each of
/// `refs` (a blob that is a manifest or index, and its `org.opencontainers.image.ref.name`).
pub fn write_layout(dir: &Path, blobs: &[&Blob], refs: &[(&Blob, &str)]) {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).expect("create the layout");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    for b in blobs {
        std::fs::write(blob_dir.join(b.hex()), &b.data).expect("write a blob");
    }
    let manifests: Vec<Value> = refs
        .iter()
        .map(|(b, name)| {
            std::fs::write(blob_dir.join(b.hex()), &b.data).expect("write a blob");
            let mut d = b.descriptor();
            d["annotations"] = json!({"org.opencontainers.image.ref.name": name});
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec_pretty(&index).expect("JSON"),
    )
    .expect("write index.json");
}

/// Reads a blob of an OCI image layout by digest.
pub fn read_layout_blob(dir: &Path, digest: &str) -> Vec<u8> {
    let (alg, hex) = digest.split_once(':').expect("alg:hex");
    std::fs::read(dir.join("blobs").join(alg).join(hex))
        .unwrap_or_else(|e| panic!("blob {digest} in {}: {e}", dir.display()))
}

/// The `index.json` of an OCI image layout.
pub fn read_layout_index(dir: &Path) -> Value {
    let bytes = std::fs::read(dir.join("index.json")).expect("read index.json");
    serde_json::from_slice(&bytes).expect("index.json is JSON")
}
