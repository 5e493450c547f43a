"""oras-py against dockside: run by tests/interop/oras.rs as

    python oras_scenario.py HOST:PORT WORKDIR

Pushes artifacts with custom media types monolithically (POST then PUT) and in chunks
(POST, PATCH..., PUT), pulls them back and compares bytes, pushes a referrer with `subject=`,
then reads the referrers API. Prints one JSON object (what it checked) on the last line of
stdout; any failed check raises, so the exit status is non-zero.
"""

import hashlib
import json
import os
import sys

import oras.client
import oras.oci
import oras.version

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    host, work = sys.argv[1], sys.argv[2]
    os.chdir(work)
    base = f"http://{host}"
    client = oras.client.OrasClient(hostname=host, insecure=True)
    report = {"oras": oras.version.__version__}

    # Content: a large random file (several chunks), a small text file, a config.
    big = os.urandom(1_300_000)
    small = b"dockside interop: " + os.urandom(16).hex().encode() + b"\n"
    with open("big.bin", "wb") as f:
        f.write(big)
    with open("small.txt", "wb") as f:
        f.write(small)
    config = json.dumps({"dockside": "interop", "nonce": os.urandom(8).hex()}).encode()
    with open("config.json", "wb") as f:
        f.write(config)
    files = [
        "big.bin:application/vnd.dockside.test.big.v1",
        "small.txt:application/vnd.dockside.test.text.v1",
    ]
    config_ref = "config.json:application/vnd.dockside.test.config.v1+json"

    pushed = {}
    for tag, chunked in (("mono", False), ("chunked", True)):
        target = f"{host}/oras/artifact-{tag}:{tag}"
        before = len(requests_log)
        resp = client.push(
            target=target,
            files=files,
            manifest_config=config_ref,
            manifest_annotations={"org.example.kind": tag},
            do_chunked=chunked,
            chunk_size=256 * 1024,
            quiet=True,
        )
        check(resp.status_code == 201, f"manifest push {tag}: {resp.status_code} {resp.text}")
        methods = [m for (m, _) in requests_log[before:]]
        if chunked:
            # 1.3 MB in 256 KiB chunks: at least 5 PATCHes for the big file.
            check(methods.count("PATCH") >= 5, f"chunked push sent {methods}")
        else:
            check("PATCH" not in methods, f"monolithic push sent {methods}")
        pushed[tag] = target

        # Pull into a fresh directory and compare bytes.
        out = os.path.join(work, "pulled-" + tag)
        paths = client.pull(target=target, outdir=out)
        got = {os.path.basename(p): open(p, "rb").read() for p in paths}
        check(got.get("big.bin") == big, f"{tag}: big.bin differs after pull")
        check(got.get("small.txt") == small, f"{tag}: small.txt differs after pull")

        manifest = client.get_manifest(target)
        check(
            manifest["config"]["mediaType"] == "application/vnd.dockside.test.config.v1+json",
            f"config media type: {manifest}",
        )
        check(
            [l["mediaType"] for l in manifest["layers"]]
            == ["application/vnd.dockside.test.big.v1", "application/vnd.dockside.test.text.v1"],
            f"layer media types: {manifest}",
        )
        report[f"{tag}_push"] = "ok"

    # The subject: the chunked artifact's manifest, exactly as the registry holds it.
    r = client.do_request(f"{base}/v2/oras/artifact-chunked/manifests/chunked", "GET", headers={"Accept": ACCEPT})
    check(r.status_code == 200, f"GET subject manifest: {r.status_code}")
    subject_digest = sha256(r.content)
    check(r.headers.get("Docker-Content-Digest") == subject_digest, "Docker-Content-Digest of the subject")
    subject = oras.oci.Subject(
        mediaType="application/vnd.oci.image.manifest.v1+json",
        digest=subject_digest,
        size=len(r.content),
    )

    # A referrer (a signature-like artifact) with subject=.
    sig = json.dumps({"signed": subject_digest, "by": "dockside interop"}).encode()
    with open("sig.json", "wb") as f:
        f.write(sig)
    with open("sig-config.json", "wb") as f:
        f.write(b"{}")
    resp = client.push(
        target=f"{host}/oras/artifact-chunked:signature",
        files=["sig.json:application/vnd.dockside.test.signature.v1+json"],
        manifest_config="sig-config.json:application/vnd.dockside.test.signature.config.v1+json",
        manifest_annotations={"org.example.signed-by": "interop"},
        subject=subject,
        quiet=True,
    )
    check(resp.status_code == 201, f"referrer push: {resp.status_code} {resp.text}")
    check(
        resp.headers.get("OCI-Subject") == subject_digest,
        f"OCI-Subject on the referrer push: {dict(resp.headers)}",
    )
    referrer_digest = resp.headers.get("Docker-Content-Digest")

    # A second referrer of another type, to see the filter work.
    with open("sbom.json", "wb") as f:
        f.write(b'{"sbom": true}')
    resp = client.push(
        target=f"{host}/oras/artifact-chunked:sbom",
        files=["sbom.json:application/vnd.dockside.test.sbom.v1+json"],
        manifest_config="sig-config.json:application/vnd.dockside.test.sbom.config.v1+json",
        subject=subject,
        quiet=True,
    )
    check(resp.status_code == 201, f"second referrer push: {resp.status_code} {resp.text}")

    # The referrers API.
    r = client.do_request(f"{base}/v2/oras/artifact-chunked/referrers/{subject_digest}", "GET")
    check(r.status_code == 200, f"referrers: {r.status_code} {r.text}")
    check(
        r.headers.get("Content-Type") == "application/vnd.oci.image.index.v1+json",
        f"referrers Content-Type {r.headers.get('Content-Type')}",
    )
    index = r.json()
    by_digest = {d["digest"]: d for d in index["manifests"]}
    check(len(by_digest) == 2, f"two referrers: {index}")
    mine = by_digest.get(referrer_digest)
    check(mine is not None, f"the signature referrer {referrer_digest} listed: {index}")
    check(
        mine["artifactType"] == "application/vnd.dockside.test.signature.config.v1+json",
        f"artifactType falls back to the config media type: {mine}",
    )
    check(
        mine.get("annotations", {}).get("org.example.signed-by") == "interop",
        f"annotations copied: {mine}",
    )

    r = client.do_request(
        f"{base}/v2/oras/artifact-chunked/referrers/{subject_digest}"
        "?artifactType=application/vnd.dockside.test.sbom.config.v1%2Bjson",
        "GET",
    )
    check(r.status_code == 200, f"filtered referrers: {r.status_code}")
    check(r.headers.get("OCI-Filters-Applied") == "artifactType", f"OCI-Filters-Applied: {dict(r.headers)}")
    only = r.json()["manifests"]
    check(
        len(only) == 1 and only[0]["artifactType"] == "application/vnd.dockside.test.sbom.config.v1+json",
        f"filtered list: {only}",
    )

    # Tags and deleting one through oras-py.
    tags = client.get_tags(f"{host}/oras/artifact-chunked")
    check(sorted(tags) == ["chunked", "sbom", "signature"], f"tags {tags}")
    deleted = client.delete_tag(f"{host}/oras/artifact-chunked", "sbom")
    check(deleted, "delete_tag")
    tags = client.get_tags(f"{host}/oras/artifact-chunked")
    check(sorted(tags) == ["chunked", "signature"], f"tags after delete {tags}")
    # delete_tag deleted the sbom manifest by digest: it leaves the referrers list.
    r = client.do_request(f"{base}/v2/oras/artifact-chunked/referrers/{subject_digest}", "GET")
    check(r.status_code == 200, f"referrers after delete: {r.status_code}")
    left = [d["digest"] for d in r.json()["manifests"]]
    check(left == [referrer_digest], f"referrers after deleting the sbom: {left}")

    report["referrers"] = len(by_digest)
    print(json.dumps(report))


# Every request oras-py sends, for checking which upload method it used.
requests_log = []


def _record(orig):
    def request(self, method, url, *args, **kwargs):
        requests_log.append((method.upper(), url))
        return orig(self, method, url, *args, **kwargs)

    return request


if __name__ == "__main__":
    import requests

    requests.Session.request = _record(requests.Session.request)
    main()
