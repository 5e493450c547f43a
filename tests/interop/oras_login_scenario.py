"""oras-py with credentials against a dockside with access control: run by
tests/interop/oras.rs as

    DOCKSIDE_USER=... DOCKSIDE_PASSWORD=... python oras_login_scenario.py HOST:PORT WORKDIR

An anonymous push must fail; after `login` a push and a pull go through: oras-py follows the
Bearer challenge to the token endpoint with the credentials, first for the scope of its first
request (pull), then, answered 403 with an `insufficient_scope` challenge, for pull and push.
(A wrong password is not tried here: oras-py retries the token request with back-off for
minutes; the other clients' tests cover it.)
Prints one JSON object on the last line of stdout; a failed check raises.
"""

import json
import os
import sys

import oras.client


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def refused(client, target, files):
    try:
        client.push(target=target, files=files)
    except BaseException:  # oras-py may sys.exit on HTTP errors
        return True
    return False


def main():
    host, work = sys.argv[1], sys.argv[2]
    user, password = os.environ["DOCKSIDE_USER"], os.environ["DOCKSIDE_PASSWORD"]
    os.chdir(work)
    data = os.urandom(300_000)
    with open("blob.bin", "wb") as f:
        f.write(data)
    files = ["blob.bin:application/vnd.dockside.test.v1"]
    target = f"{host}/private/oras:v1"
    report = {}

    anon = oras.client.OrasClient(hostname=host, insecure=True)
    check(refused(anon, target, files), "an anonymous push went through")
    report["anonymous_push"] = "refused"

    client = oras.client.OrasClient(hostname=host, insecure=True)
    client.login(username=user, password=password, hostname=host,
                 config_path=os.path.join(work, "config.json"))
    client.push(target=target, files=files)
    report["push"] = "ok"

    os.mkdir("out")
    pulled = client.pull(target=target, outdir="out")
    check(len(pulled) == 1, f"pulled {pulled}")
    with open(pulled[0], "rb") as f:
        check(f.read() == data, "the pulled blob differs")
    report["pull"] = "ok"
    print(json.dumps(report))


if __name__ == "__main__":
    main()
