// @sigstore/oci against dockside: run by tests/interop/sigstore.rs as
//
//   NODE_PATH=<node_modules> node sigstore_scenario.js HOST:PORT/REPO TAG
//
// Resolves the tag with getImageDigest, then attaches a signature-like artifact (a Sigstore
// bundle media type) to the image with attachArtifactToImage. Prints one JSON line: the
// package version, the resolved digest, the artifact's descriptor.
//
// No credentials are passed: with credentials, @sigstore/oci 0.6 first POSTs an upload to
// "sign in" and accepts only 200 or a 401 challenge; a registry without authentication answers
// that POST with the spec's 202, which the client then fails to parse as a challenge.
'use strict';

const oci = require('@sigstore/oci');
const version = require('@sigstore/oci/package.json').version;

async function main() {
  const [imageName, tag] = process.argv.slice(2);
  const imageDigest = await oci.getImageDigest({ imageName, imageTag: tag });
  const artifact = Buffer.from(
    JSON.stringify({
      mediaType: 'application/vnd.dev.sigstore.bundle.v0.3+json',
      verificationMaterial: { note: 'dockside interop test, not a real signature' },
      messageSignature: { messageDigest: { algorithm: 'SHA2_256', digest: imageDigest } },
    }),
  );
  const descriptor = await oci.attachArtifactToImage({
    imageName,
    imageDigest,
    artifact,
    mediaType: 'application/vnd.dev.sigstore.bundle.v0.3+json',
    annotations: { 'dev.sigstore.bundle.predicateType': 'https://slsa.dev/provenance/v1' },
  });
  console.log(JSON.stringify({ version, imageDigest, descriptor }));
}

main().catch((err) => {
  console.error(err);
  if (err.cause) console.error('cause:', err.cause);
  process.exit(1);
});
