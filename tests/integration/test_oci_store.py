"""The OCI registry store against a real registry (the CNCF Distribution registry, ``docker-registry``):
publish, aliases, pulls checked byte by byte, auth by password file and by Docker config, and TLS with
a private CA."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import joblib
import pytest
from cli_runner import run_cli
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.errors import StoreConflict
from serving.repository import Repository
from serving.settings import Settings
from serving.store.factory import open_store
from serving.testing.registry import Registry, find_registry, run_registry

pytest.importorskip("oras", reason="the oci extra is not installed")
BINARY = find_registry()
if BINARY is None:
    pytest.skip("docker-registry is not installed (apt-get install docker-registry)", allow_module_level=True)

X, Y = load_iris(return_X_y=True)
ROW = "[[5.1, 3.5, 1.4, 0.2]]"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    assert BINARY is not None
    with run_registry(BINARY, tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "iris.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(X, Y), path)
    return path


def _use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry: Registry, namespace: str) -> None:
    for name in ("SERVING_OCI_USERNAME", "SERVING_OCI_PASSWORD_FILE", "SERVING_OCI_CA_FILE", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SERVING_STORE", f"oci://{registry.host}/{namespace}")
    monkeypatch.setenv("SERVING_OCI_PLAIN_HTTP", "true" if registry.scheme == "http" else "false")
    monkeypatch.setenv("SERVING_OCI_DOCKER_CONFIG", str(tmp_path / "no-docker-config.json"))
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SERVING_PROGRESS", "false")


def _manifest(registry: Registry, repo: str, tag: str) -> tuple[dict[str, object], str]:
    with registry.client() as client:
        response = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    response.raise_for_status()
    return response.json(), response.headers["Docker-Content-Digest"]


def test_publish_alias_and_predict_through_the_registry(
    registry: Registry,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use(monkeypatch, tmp_path, registry, "team-a")
    for _ in range(2):
        code, _, err = run_cli(capsys, "publish", str(model), "--name", "iris", "--alias", "production")
        assert code == 0, err
    code, out, err = run_cli(capsys, "--json", "versions", "iris")
    assert code == 0, err
    assert [v["version"] for v in json.loads(out)["versions"]] == ["1", "2"]
    code, _, err = run_cli(capsys, "rollback", "iris", "production")
    assert code == 0, err
    code, out, err = run_cli(capsys, "--json", "predict", "iris@production", "--input", ROW)
    assert code == 0, err
    assert json.loads(out)["model_version"] == "1"

    # NOTE: what any OCI tool sees: the version is tag "1", its file a ModelPack layer
    artifact, _ = _manifest(registry, "team-a/iris", "1")
    assert artifact["artifactType"] == "application/vnd.serving.model.v1"
    config = artifact["config"]
    assert isinstance(config, dict)
    assert config["mediaType"] == "application/vnd.serving.manifest.v1+json"
    [layer] = artifact["layers"]  # type: ignore[misc]
    assert layer["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert layer["annotations"]["org.opencontainers.image.title"] == "iris.joblib"
    assert layer["digest"] == "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    with registry.client() as client:
        tags = client.get("/v2/team-a/iris/tags/list").json()["tags"]
    assert {"1", "2", "_alias.production"} <= set(tags)


def test_a_replica_follows_the_alias_tag_by_digest(
    registry: Registry,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use(monkeypatch, tmp_path, registry, "team-b")
    for _ in range(2):
        assert run_cli(capsys, "publish", str(model), "--name", "iris")[0] == 0
    assert run_cli(capsys, "alias", "set", "iris", "production", "1")[0] == 0
    repo = Repository(open_store())
    first = repo.check_alias("iris", "production", None)
    assert first.alias is not None
    assert first.alias.version == "1"
    assert first.etag == _manifest(registry, "team-b/iris", "_alias.production")[1]
    assert repo.check_alias("iris", "production", first.etag).alias is None  # NOTE: unchanged: no body
    assert run_cli(capsys, "alias", "set", "iris", "production", "2")[0] == 0
    moved = repo.check_alias("iris", "production", first.etag)
    assert moved.alias is not None
    assert moved.alias.version == "2"


def test_a_stale_conditional_write_is_refused(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, tmp_path, registry, "team-c")
    store = open_store()
    store.put("iris/aliases/production.json", b'{"v": 1}', if_absent=True)
    _, etag = store.get("iris/aliases/production.json")
    store.put("iris/aliases/production.json", b'{"v": 2}', if_match=etag)
    with pytest.raises(StoreConflict):
        store.put("iris/aliases/production.json", b'{"v": 3}', if_match=etag)
    with pytest.raises(FileExistsError):
        store.put("iris/aliases/production.json", b'{"v": 4}', if_absent=True)
    assert store.get("iris/aliases/production.json")[0] == b'{"v": 2}'


def test_bytes_a_registry_swapped_in_are_refused_before_any_load(
    registry: Registry,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whoever can push to the registry re-tags version 1 with other weights under the same name."""
    _use(monkeypatch, tmp_path, registry, "team-d")
    assert run_cli(capsys, "publish", str(model), "--name", "iris")[0] == 0
    _swap_layer(
        registry, "team-d/iris", "1", pickle_of(LogisticRegression(max_iter=500, C=0.001).fit(X, Y), tmp_path)
    )
    code, _, err = run_cli(capsys, "predict", "iris:1", "--input", ROW)
    assert code != 0
    assert "iris.joblib" in err, err
    assert "sha256" in err or "bytes" in err, err


def pickle_of(estimator: LogisticRegression, tmp_path: Path) -> bytes:
    path = tmp_path / "evil.joblib"
    joblib.dump(estimator, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    assert BINARY is not None
    with run_registry(
        BINARY, tmp_path_factory.mktemp("locked"), auth=("ci", "s3cret-token"), tls=True
    ) as running:
        yield running


def test_auth_and_tls_from_a_password_file_a_docker_config_and_a_private_ca(
    locked: Registry,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use(monkeypatch, tmp_path, locked, "secure")
    assert locked.ca_path is not None
    # NOTE: the private CA is not trusted yet: a TLS failure, said once
    code, _, err = run_cli(capsys, "publish", str(model), "--name", "iris")
    assert code != 0
    assert "TLS verification failed" in err, err
    monkeypatch.setenv("SERVING_OCI_CA_FILE", str(locked.ca_path))
    code, _, err = run_cli(capsys, "publish", str(model), "--name", "iris")
    assert code != 0
    assert "asks for a login: set SERVING_OCI_USERNAME" in err, err
    password = tmp_path / "password"
    password.write_text("not-the-token\n")
    monkeypatch.setenv("SERVING_OCI_USERNAME", "ci")
    monkeypatch.setenv("SERVING_OCI_PASSWORD_FILE", str(password))
    code, _, err = run_cli(capsys, "publish", str(model), "--name", "iris")
    assert code != 0
    assert "refused the credentials" in err, err
    password.write_text("s3cret-token\n")
    code, _, err = run_cli(capsys, "publish", str(model), "--name", "iris", "--alias", "production")
    assert code == 0, err
    monkeypatch.delenv("SERVING_OCI_USERNAME")
    monkeypatch.delenv("SERVING_OCI_PASSWORD_FILE")
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    token = base64.b64encode(b"ci:s3cret-token").decode()
    config.write_text(json.dumps({"auths": {locked.host: {"auth": token}}}))
    monkeypatch.setenv("SERVING_OCI_DOCKER_CONFIG", str(config))
    code, out, err = run_cli(capsys, "--json", "predict", "iris@production", "--input", ROW)
    assert code == 0, err
    assert json.loads(out)["outputs"]["predict"] == [0]


def test_a_model_name_a_registry_cannot_hold_is_refused_clearly(
    registry: Registry,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use(monkeypatch, tmp_path, registry, "team-e")
    code, _, err = run_cli(capsys, "publish", str(model), "--name", "Iris")
    assert code != 0
    assert "cannot be an OCI repository" in err, err


def test_settings_reach_the_store(registry: Registry, tmp_path: Path) -> None:
    store = open_store(f"oci://{registry.host}/ns", Settings(oci_plain_http=True, cache_dir=tmp_path))
    assert store.uri == f"oci://{registry.host}/ns"
    assert httpx.get(f"{registry.url}/v2/").status_code == 200


def _swap_layer(registry: Registry, repo: str, tag: str, data: bytes) -> None:
    """As whoever can push to the registry: tag ``tag`` again, its one layer replaced by ``data``."""
    artifact, _ = _manifest(registry, repo, tag)
    artifact["layers"][0].update(digest=_digest(data), size=len(data))  # type: ignore[index]
    _push(registry, repo, tag, artifact, data)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _push(registry: Registry, repo: str, tag: str, artifact: dict[str, object], blob: bytes) -> None:
    """Upload ``blob`` and tag ``artifact`` as ``tag``, through the registry's API as any client would."""
    with registry.client() as client:
        location = client.post(f"/v2/{repo}/blobs/uploads/").headers["Location"]
        joiner = "&" if "?" in location else "?"  # NOTE: keep the upload session's own query
        client.put(f"{location}{joiner}digest={_digest(blob)}", content=blob).raise_for_status()
        client.put(
            f"/v2/{repo}/manifests/{tag}",
            content=json.dumps(artifact),
            headers={"Content-Type": OCI_MANIFEST},
        ).raise_for_status()


def test_a_server_swaps_on_a_tag_move_with_no_failed_request_and_refuses_a_swapped_layer(
    registry: Registry,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serving serve`` on the registry: moving the alias swaps under load with every request
    answered; a version whose layer was replaced in the registry is refused and the old one serves."""
    import threading

    from test_standalone_process import index_entry, infer, start_server

    from serving.testing.poll import wait_for

    _use(monkeypatch, tmp_path, registry, "team-f")
    for c in (1.0, 0.01, 0.5):
        joblib.dump(LogisticRegression(max_iter=500, C=c).fit(X, Y), model)
        assert run_cli(capsys, "publish", str(model), "--name", "iris", "--example", ROW)[0] == 0
    assert run_cli(capsys, "alias", "set", "iris", "production", "1")[0] == 0
    _swap_layer(
        registry, "team-f/iris", "3", pickle_of(LogisticRegression(max_iter=500, C=9.0).fit(X, Y), tmp_path)
    )
    server = start_server(
        tmp_path,
        f"oci://{registry.host}/team-f",
        ["iris"],
        poll_s=0.5,
        env_extra={"SERVING_OCI_PLAIN_HTTP": "true"},
    )
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = infer(client, server.base, "iris")
                except httpx.HTTPError as exc:
                    results.append((0, repr(exc)))
                    continue
                results.append(
                    (r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text)
                )

    thread = threading.Thread(target=hammer)
    try:
        with httpx.Client(timeout=10) as client:
            wait_for(
                lambda: infer(client, server.base, "iris").status_code == 200,
                what="version 1 loaded from the registry",
            )
            thread.start()
            wait_for(lambda: len(results) > 20, what="traffic on version 1")
            assert run_cli(capsys, "alias", "set", "iris", "production", "2")[0] == 0
            wait_for(lambda: results[-1] == (200, "2"), what="the swap to version 2")
            assert run_cli(capsys, "alias", "set", "iris", "production", "3")[0] == 0
            replica = wait_for(
                lambda: (
                    (r := index_entry(client, server.base, "iris")["replicas"][0])["failed_version"] == "3"
                    and r
                ),
                what="version 3 to be refused",
            )
            seen = len(results)
            wait_for(lambda: len(results) > seen + 20, what="traffic after the refusal")
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        server.stop()
    assert replica["live_version"] == "2"
    assert "iris.joblib" in replica["last_error"], replica["last_error"]
    assert [r for r in results if r[0] != 200] == []
    versions = [v for _, v in results]
    assert versions == sorted(versions), "a request went back to version 1"  # NOTE: 1s, then 2s, never 3
    assert set(versions) == {"1", "2"}


def test_a_login_in_the_store_address_and_a_tag_past_128_characters_are_refused(
    registry: Registry,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from serving.errors import InvalidReference

    with pytest.raises(InvalidReference, match="takes no login") as refused:
        open_store(f"oci://alice:s3cret@{registry.host}/ns", Settings(oci_plain_http=True))
    assert "s3cret" not in str(refused.value)
    _use(monkeypatch, tmp_path, registry, "team-g")
    assert run_cli(capsys, "publish", str(model), "--name", "iris")[0] == 0
    code, _, err = run_cli(capsys, "alias", "set", "iris", "a" * 124, "1")
    assert code != 0
    assert "over a registry's 128 characters" in err, err


def test_another_image_under_a_tag_is_not_a_version(
    registry: Registry,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``latest`` pushed by another tool into the model's repository (an empty-config artifact)."""
    _use(monkeypatch, tmp_path, registry, "team-h")
    assert run_cli(capsys, "publish", str(model), "--name", "iris")[0] == 0
    artifact, _ = _manifest(registry, "team-h/iris", "1")
    artifact["config"] = {
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": _digest(b"{}"),
        "size": 2,
    }
    _push(registry, "team-h/iris", "latest", artifact, b"{}")
    code, out, err = run_cli(capsys, "--json", "versions", "iris")
    assert code == 0, err
    assert [v["version"] for v in json.loads(out)["versions"]] == ["1"]
    code, _, err = run_cli(capsys, "predict", "iris:latest", "--input", ROW)
    assert code != 0
    assert "not found" in err, err


def test_bearer_tokens_are_asked_for_each_repository_a_401_names(tmp_path: Path) -> None:
    """A token registry (Harbor, GHCR, Docker Hub) scopes each token to one repository and action:
    the Distribution registry needs a separate token server for that, so this one is a small
    stand-in that answers like them. Two models in a row, each with its own token."""
    import http.server
    import re
    import threading

    from serving.testing import free_port

    port = free_port()
    issued: list[str] = []

    class TokenRegistry(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return

        def _challenge(self, scope: str) -> None:
            self.send_response(401)
            realm = f'Bearer realm="http://127.0.0.1:{port}/token",service="reg",scope="{scope}"'
            self.send_header("Www-Authenticate", realm)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            if self.path.startswith("/token"):
                scope = re.search(r"scope=([^&]+)", self.path)
                token = f"tok-{scope.group(1) if scope else 'none'}"
                issued.append(token)
                body = json.dumps({"token": token}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.do_HEAD()

        def do_HEAD(self) -> None:
            match = re.match(r"/v2/([^/]+/[^/]+)/manifests/", self.path)
            if match is None:
                self._challenge("registry:catalog:*")
                return
            scope = f"repository%3A{match.group(1).replace('/', '%2F')}%3Apull"
            if self.headers.get("Authorization") not in (
                f"Bearer tok-{scope}",
                f"Bearer tok-{scope.replace('%3A', ':').replace('%2F', '/')}",
            ):
                self._challenge(f"repository:{match.group(1)}:pull")
                return
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), TokenRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        store = open_store(f"oci://127.0.0.1:{port}/ns", Settings(oci_plain_http=True, cache_dir=tmp_path))
        assert store.exists("a/versions/1/manifest.json") is False
        assert store.exists("b/versions/1/manifest.json") is False  # NOTE: refused before the fix
        assert store.exists("a/versions/2/manifest.json") is False
        assert len(issued) == 3
        assert len({token.replace("%3A", ":").replace("%2F", "/") for token in issued}) == 2
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
