"""``serving.testing.registry`` against the real ``docker-registry`` binary: push, auth, TLS, cleanup."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from serving.testing.registry import Registry, bcrypt_hash, find_registry, run_registry

BINARY = find_registry()
if BINARY is None:
    pytest.skip(
        "no docker-registry binary (apt-get install docker-registry, or set $DOCKER_REGISTRY)",
        allow_module_level=True,
    )

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def push_blob(client: httpx.Client, name: str, data: bytes) -> dict[str, object]:
    """A monolithic upload: POST for a session, then one PUT with the digest; the descriptor back."""
    started = client.post(f"/v2/{name}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    sep = "&" if "?" in location else "?"
    done = client.put(
        f"{location}{sep}digest={digest(data)}",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status_code == 201, done.text
    assert done.headers["Docker-Content-Digest"] == digest(data)
    return {"digest": digest(data), "size": len(data)}


def closed(port: int) -> bool:
    """Whether nothing accepts a connection on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


@pytest.mark.parametrize(
    ("password", "setting", "expected"),
    [  # NOTE: Openwall crypt_blowfish / OpenBSD test vectors
        (
            "U*U",
            "$2a$05$CCCCCCCCCCCCCCCCCCCCC.",
            "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW",
        ),
        ("", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.7uG0VCzI2bS7j6ymqJi9CdcdxiRTWNy"),
        (
            "U*U*",
            "$2a$05$CCCCCCCCCCCCCCCCCCCCC.",
            "$2a$05$CCCCCCCCCCCCCCCCCCCCC.VGOzA784oUp/Z0DY336zx7pLYAy0lwK",
        ),
    ],
)
def test_bcrypt_hash_matches_known_vectors(password: str, setting: str, expected: str) -> None:
    assert bcrypt_hash(password, setting) == expected


def test_bcrypt_hash_salts_randomly() -> None:
    one, two = bcrypt_hash("pw"), bcrypt_hash("pw")
    assert one != two
    assert one.startswith("$2y$05$")
    assert len(one) == 60
    assert bcrypt_hash("pw", one[:29]) == one


def test_push_and_pull_a_manifest_without_auth(tmp_path: Path) -> None:
    assert BINARY is not None
    with run_registry(BINARY, tmp_path) as reg:
        assert reg.scheme == "http"
        assert reg.url == f"http://{reg.host}"
        assert reg.username is None
        assert reg.password is None
        assert reg.ca_path is None
        with reg.client() as client:
            assert client.get("/v2/").status_code == 200
            config = {"mediaType": OCI_EMPTY, **push_blob(client, "models/iris", b"{}")}
            layer_bytes = b"model weights \x00\x01\x02" * 100
            layer = {"mediaType": OCI_LAYER, **push_blob(client, "models/iris", layer_bytes)}
            manifest = json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]}
            ).encode()
            put = client.put(
                "/v2/models/iris/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST}
            )
            assert put.status_code == 201, put.text
            assert put.headers["Docker-Content-Digest"] == digest(manifest)

            got = client.get("/v2/models/iris/manifests/v1", headers={"Accept": OCI_MANIFEST})
            assert got.status_code == 200, got.text
            assert got.headers["Content-Type"] == OCI_MANIFEST
            assert got.content == manifest
            blob = client.get(f"/v2/models/iris/blobs/{layer['digest']}", follow_redirects=True)
            assert blob.status_code == 200
            assert blob.content == layer_bytes
            assert client.get("/v2/models/iris/tags/list").json() == {"name": "models/iris", "tags": ["v1"]}
        assert any(reg.root.rglob("data")), "the blobs are stored under root"


def test_htpasswd_auth(tmp_path: Path) -> None:
    assert BINARY is not None
    with run_registry(BINARY, tmp_path, auth=("alice", "s3cret pass")) as reg:
        assert (reg.username, reg.password) == ("alice", "s3cret pass")
        bare = httpx.get(f"{reg.url}/v2/", timeout=10)
        assert bare.status_code == 401
        assert bare.headers["WWW-Authenticate"].startswith("Basic ")
        assert httpx.get(f"{reg.url}/v2/", auth=("alice", "s3cret pass"), timeout=10).status_code == 200
        assert httpx.get(f"{reg.url}/v2/", auth=("alice", "wrong"), timeout=10).status_code == 401
        assert httpx.get(f"{reg.url}/v2/", auth=("bob", "s3cret pass"), timeout=10).status_code == 401
        with reg.client() as client:
            assert client.get("/v2/").status_code == 200


def test_tls_verifies_against_the_ca_only(tmp_path: Path) -> None:
    assert BINARY is not None
    with run_registry(BINARY, tmp_path, tls=True, auth=("alice", "pw")) as reg:
        assert reg.scheme == "https"
        assert reg.url.startswith("https://127.0.0.1:")
        assert reg.ca_path is not None
        assert reg.ca_path.is_file()
        trust = ssl.create_default_context(cafile=str(reg.ca_path))
        assert httpx.get(f"{reg.url}/v2/", verify=trust, auth=("alice", "pw"), timeout=10).status_code == 200
        port = reg.host.rpartition(":")[2]
        by_name = httpx.get(f"https://localhost:{port}/v2/", verify=trust, timeout=10)
        assert by_name.status_code == 401  # NOTE: the certificate names localhost too
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{reg.url}/v2/", timeout=10)  # NOTE: the system trust store does not know the CA
        assert httpx.get(f"http://{reg.host}/v2/", timeout=10).status_code == 400  # NOTE: plain HTTP
        with reg.client() as client:
            assert client.get("/v2/").status_code == 200


def test_stops_on_exit_also_when_the_body_raises(tmp_path: Path) -> None:
    assert BINARY is not None
    regs: list[Registry] = []
    with run_registry(BINARY, tmp_path / "ok") as reg:
        regs.append(reg)

    def fail_inside() -> None:
        assert BINARY is not None
        with run_registry(BINARY, tmp_path / "raises") as reg:
            regs.append(reg)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert len(regs) == 2
    for reg in regs:
        assert reg.process.poll() is not None, "the registry process has exited"
        assert closed(int(reg.host.rpartition(":")[2])), "nothing listens on its port any more"


def test_an_early_exit_fails_with_the_log(tmp_path: Path) -> None:
    script = tmp_path / "broken-registry"
    script.write_text("#!/bin/sh\necho 'configuration error: nope' >&2\nexit 3\n")
    script.chmod(0o755)
    with (
        pytest.raises(AssertionError, match="exited 3: configuration error: nope"),
        run_registry(str(script), tmp_path / "work"),
    ):
        pass  # pragma: no cover
