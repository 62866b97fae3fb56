"""The ``serving`` command as a user runs it: a real subprocess against a real store.

Every store-facing test runs against a local folder and against the moto S3
server on loopback. Errors must end with the error tree's exit code and exactly
one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from serving.testing import MotoS3, free_port

EXAMPLE = [[5.1, 3.5, 1.4, 0.2]]

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed's model, saved by the user with joblib (what `serving publish` takes)."""
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    path = tmp_path_factory.mktemp("artifact") / "model.joblib"
    joblib.dump(LogisticRegression(max_iter=200).fit(x, y), path)
    return path


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("bucket")  # also points AWS_* at the moto server
    return f"s3://{bucket}/models"


@pytest.fixture
def cli(store_uri: str, tmp_path: Path) -> Cli:
    """Run ``serving ARGS...`` in a child process with this test's store and cache."""

    def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
        full_env = {
            **_clean_env(),
            "SERVING_STORE": store_uri,
            "SERVING_CACHE_DIR": str(tmp_path / "cache"),
            "SERVING_S3_ADDRESSING_STYLE": "path",
            "SERVING_S3_CONNECT_TIMEOUT": "1",
            "SERVING_S3_READ_TIMEOUT": "5",
            "SERVING_S3_MAX_ATTEMPTS": "1",
            **(env or {}),
        }
        return subprocess.run(
            [sys.executable, "-m", "serving.cli", *args],
            env=full_env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result).stdout)


def assert_error(result: subprocess.CompletedProcess[str], exit_code: int, *words: str) -> str:
    """Exit ``exit_code``, one ``serving: error:`` line on stderr mentioning ``words``."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("serving: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def published(cli: Cli, artifact: Path) -> Cli:
    """``iris:1`` published from the joblib file, ``production -> 1``."""
    ok(cli("publish", str(artifact), "--name", "iris", "--alias", "production"))
    return cli


# -- the happy path -------------------------------------------------------------------------
def test_publish_detects_the_format_and_numbers_versions_from_1(cli: Cli, artifact: Path) -> None:
    """publish without --format detects sklearn/joblib and gives versions 1, 2, ..."""
    first = as_json(cli("publish", str(artifact), "--name", "iris", "--json"))
    second = as_json(
        cli(
            "--json",
            "publish",
            str(artifact),
            "--name",
            "iris",
            "--metadata",
            "git=abc123",
            "--example",
            "[[1,2,3,4]]",
        )
    )
    assert (first["version"], second["version"]) == ("1", "2")
    assert first["format"] == second["format"]
    assert first["files"] == 1
    assert first["total_bytes"] == artifact.stat().st_size
    assert len(first["manifest_sha256"]) == 64


def test_versions_lists_each_version_with_its_aliases(published: Cli, artifact: Path) -> None:
    """versions shows every published version and which aliases point at it."""
    ok(published("publish", str(artifact), "--name", "iris", "--version", "2", "--alias", "staging"))
    listing = as_json(published("versions", "iris", "--json"))
    assert listing["name"] == "iris"
    assert [(v["version"], v["aliases"]) for v in listing["versions"]] == [
        ("1", ["production"]),
        ("2", ["staging"]),
    ]
    text = ok(published("versions", "iris")).stdout
    assert text.splitlines()[0].split() == ["VERSION", "FORMAT", "CREATED", "SIZE", "ALIASES"]
    assert "production" in text.splitlines()[1]


def test_versions_lists_the_others_past_a_bad_manifest_and_a_planted_name(
    published: Cli, store_uri: str
) -> None:
    """What a bucket writer plants (a manifest no reader accepts, a folder that is not a plain name)
    costs that entry only: the listing shows every other version."""
    from serving.store import open_store

    store = open_store(store_uri)
    good, _ = store.get("iris/versions/1/manifest.json")
    store.put("iris/versions/2/manifest.json", b"{not json")
    # NOTE: "1\n" where the store takes it (S3 refuses a newline in a key).
    planted = "1 copy" if store_uri.startswith("s3://") else "1\n"
    store.put(f"iris/versions/{planted}/manifest.json", good)
    listing = as_json(published("versions", "iris", "--json"))
    assert [v["version"] for v in listing["versions"]] == ["1", "2"]
    assert listing["versions"][0]["format"] == "sklearn"
    assert "manifest" in listing["versions"][1]["error"]
    assert "unreadable" in ok(published("versions", "iris")).stdout


def test_alias_set_moves_the_alias_and_alias_get_reads_it(published: Cli, artifact: Path) -> None:
    """alias set points NAME@ALIAS at a version; alias get prints that version."""
    ok(published("publish", str(artifact), "--name", "iris"))
    moved = as_json(published("alias", "set", "iris", "production", "2", "--json"))
    assert moved["version"] == "2"
    assert [h["version"] for h in moved["history"]] == ["1"]
    assert ok(published("alias", "get", "iris", "production")).stdout.strip() == "2"
    got = as_json(published("--json", "alias", "get", "iris", "production"))
    assert got["version"] == "2"
    assert len(got["manifest_sha256"]) == 64


def test_rollback_moves_the_alias_to_its_previous_target(published: Cli, artifact: Path) -> None:
    """rollback NAME ALIAS returns the alias to the version it pointed at before."""
    ok(published("publish", str(artifact), "--name", "iris", "--alias", "production"))
    assert ok(published("alias", "get", "iris", "production")).stdout.strip() == "2"
    rolled = as_json(published("rollback", "iris", "production", "--json"))
    assert (rolled["version"], rolled["rolled_back_from"]) == ("1", "2")
    assert ok(published("alias", "get", "iris", "production")).stdout.strip() == "1"
    assert_error(published("rollback", "iris", "production"), 3, "no previous target")


def test_canary_shadow_promote_and_abort_through_the_alias(published: Cli, artifact: Path) -> None:
    """--canary and --shadow keep the target; promote moves it to the canary; abort drops both."""
    for _ in range(2):
        ok(published("publish", str(artifact), "--name", "iris"))
    text = ok(published("alias", "set", "iris", "production", "2", "--canary", "30")).stdout.strip()
    assert text == "iris@production -> 1 (canary 2 at 30%)"
    both = as_json(published("alias", "set", "iris", "production", "3", "--shadow", "0.5", "--json"))
    assert (both["version"], both["canary"]["weight"], both["shadow"]["fraction"]) == ("1", 30, 0.5)
    assert ok(published("alias", "get", "iris", "production")).stdout.strip() == (
        "1 (canary 2 at 30%, shadow 3 on 50% of requests)"
    )
    promoted = ok(published("alias", "promote", "iris", "production")).stdout.strip()
    assert promoted == "iris@production -> 2 (canary promoted, was 1) (shadow 3 on 50% of requests)"
    aborted = ok(published("alias", "abort", "iris", "production")).stdout.strip()
    assert aborted == "iris@production -> 2 (dropped shadow 3 on 50% of requests)"
    assert_error(published("alias", "abort", "iris", "production"), 2, "no canary or shadow")
    assert_error(published("alias", "promote", "iris", "production"), 2, "no canary to promote")
    assert_error(
        published("alias", "set", "iris", "production", "2", "--canary", "5"), 2, "already points at 2"
    )
    assert published("alias", "set", "iris", "production", "1", "--canary", "150").returncode == 2
    assert_error(published("rollout", "iris", "production", "1"), 2, "--url")


def test_pull_caches_the_version_once_and_verify_rehashes_it(published: Cli, tmp_path: Path) -> None:
    """pull downloads into SERVING_CACHE_DIR once; verify re-hashes the cached files."""
    first = as_json(published("pull", "iris@production", "--json"))
    assert (first["name"], first["version"], first["hit"]) == ("iris", "1", False)
    assert Path(first["path"]).is_relative_to(tmp_path / "cache")
    assert (Path(first["path"]) / "manifest.json").is_file()
    again = as_json(published("pull", "iris:1", "--json"))
    assert (again["hit"], again["path"]) == (True, first["path"])
    verified = as_json(published("verify", "iris", "--json"))
    assert verified["ok"] is True
    assert "match the manifest" in ok(published("verify", "iris@production")).stdout


def test_verify_reports_cached_bytes_that_changed(published: Cli) -> None:
    """A cached file altered after download fails verify with the integrity exit code."""
    pulled = as_json(published("pull", "iris@production", "--json"))
    model = next(p for p in Path(pulled["path"]).iterdir() if p.name != "manifest.json")
    model.chmod(0o600)
    with model.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert_error(published("verify", "iris@production"), 5, "iris:1", "changed", "--repair")


def test_a_changed_cached_byte_is_pulled_again_and_verify_repair_fixes_it(published: Cli) -> None:
    """pull never says "already cached" for changed bytes; verify --repair evicts and re-pulls."""
    pulled = as_json(published("pull", "iris@production", "--json"))
    model = next(p for p in Path(pulled["path"]).iterdir() if p.name != "manifest.json")
    good = model.read_bytes()
    model.chmod(0o600)
    with model.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(bytes([good[-1] ^ 0xFF]))
    assert as_json(published("pull", "iris@production", "--json"))["hit"] is False
    assert model.read_bytes() == good

    # the same change with its mtime restored: only a full re-hash sees it. pull trusts a stat
    # stamp only over files flushed to disk, which a cache that re-hashes at every load (the
    # default) never flushes: it re-hashes too.
    def flip_keeping_mtime() -> None:
        st = model.stat()
        with model.open("r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(bytes([good[-1] ^ 0xFF]))
        os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))

    flip_keeping_mtime()
    assert as_json(published("pull", "iris@production", "--json"))["hit"] is False
    assert model.read_bytes() == good
    flip_keeping_mtime()
    repaired = as_json(published("verify", "--repair", "iris@production", "--json"))
    assert repaired["repaired"] is True
    assert model.read_bytes() == good
    assert as_json(published("verify", "iris@production", "--json"))["repaired"] is False


def test_predict_answers_class_0_for_the_seed_example(published: Cli) -> None:
    """predict loads iris@production in-process and answers setosa (0) for the seed's row."""
    result = as_json(published("predict", "iris@production", "--input", json.dumps(EXAMPLE)))
    assert result["model_name"] == "iris"
    assert result["model_version"] == "1"
    assert result["outputs"]["predict"] == [0]


def test_publish_detects_a_skops_file_and_predict_loads_it(cli: Cli, tmp_path: Path) -> None:
    """publish takes a .skops file without --format; predict loads it through skops's trusted types."""
    skops_io = pytest.importorskip("skops.io")
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    path = tmp_path / "iris.skops"
    skops_io.dump(LogisticRegression(max_iter=200).fit(*load_iris(return_X_y=True)), path)
    assert as_json(cli("publish", str(path), "--name", "iris", "--json"))["format"] == "skops"
    assert as_json(cli("predict", "iris:1", "--input", json.dumps(EXAMPLE)))["outputs"]["predict"] == [0]


def test_predict_reads_input_from_stdin_and_named_inputs(published: Cli) -> None:
    """--input - reads stdin; a JSON object names the model's inputs."""
    rows = ok(published("predict", "iris", "--input", "-", stdin=json.dumps(EXAMPLE)))
    assert json.loads(rows.stdout)["model_version"] == "1"
    pulled = as_json(published("pull", "iris", "--json"))
    manifest = json.loads((Path(pulled["path"]) / "manifest.json").read_text())
    if manifest.get("inputs"):
        name = manifest["inputs"][0]["name"]
        named = as_json(published("predict", "iris:1", "--input", json.dumps({name: EXAMPLE})))
        assert named["outputs"] == json.loads(rows.stdout)["outputs"]


@pytest.mark.parametrize("store_uri", ["local"], indirect=True)
def test_a_reader_that_leaves_early_ends_predict_quietly_with_141(
    published: Cli, store_uri: str, tmp_path: Path
) -> None:
    """``serving predict ... | head -c 20`` (the reader leaves while a big answer is written) and
    ``... | true`` (it left before a small one, still in Python's buffer, is flushed): no
    traceback on stderr; exit 141, as a tool killed by SIGPIPE."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(EXAMPLE * 50_000))  # NOTE: an answer well past a pipe's 64 KiB
    one = tmp_path / "one.json"
    one.write_text(json.dumps(EXAMPLE))
    env = {**_clean_env(), "SERVING_STORE": store_uri, "SERVING_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTHONUNBUFFERED", None)  # NOTE: buffered, as a user's shell runs it
    err = tmp_path / "err"
    for source, reader, shown in ((rows, "head -c 20", '{"model_name": "iris'), (one, "true", "")):
        cmd = f"{sys.executable} -m serving.cli predict iris --input - < {source} 2> {err} | {reader}"
        done = subprocess.run(
            ["bash", "-c", f"{cmd}; status=${{PIPESTATUS[0]}}; echo; echo rc=$status"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert done.stdout == f"{shown}\nrc=141\n", (reader, done.stdout)
        assert err.read_text() == "", reader


def test_signed_publish_satisfies_require_signature_and_unsigned_is_refused(
    cli: Cli, artifact: Path, tmp_path: Path
) -> None:
    """publish --signing-key writes manifest.sig; with SERVING_REQUIRE_SIGNATURE predict
    loads the signed version and refuses the unsigned one (exit 6) before loading it."""
    from serving.signing import generate_keypair

    keys = generate_keypair(tmp_path / "release")
    ok(cli("publish", str(artifact), "--name", "iris", "--signing-key", str(keys.key_path)))
    ok(cli("publish", str(artifact), "--name", "iris"))
    strict = {"SERVING_REQUIRE_SIGNATURE": "true", "SERVING_TRUSTED_KEYS": str(keys.pub_path)}
    signed = as_json(cli("predict", "iris:1", "--input", json.dumps(EXAMPLE), env=strict))
    assert signed["outputs"]["predict"] == [0]
    assert_error(cli("predict", "iris:2", "--input", json.dumps(EXAMPLE), env=strict), 6, "iris")
    assert_error(cli("publish", str(artifact), "--name", "iris", "--signing-key", str(artifact)), 2)


# -- mistakes: exit codes and one line on stderr ------------------------------------------------
def test_unknown_format_exits_2(cli: Cli, tmp_path: Path) -> None:
    """An artifact no format recognises is refused before anything is uploaded."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    assert_error(cli("publish", str(notes), "--name", "iris"), 2)
    assert_error(cli("publish", str(notes), "--name", "iris", "--format", "no-such-format"), 2)
    assert_error(cli("versions", "iris"), 3, "iris")


def test_missing_path_exits_2(cli: Cli, tmp_path: Path) -> None:
    assert_error(cli("publish", str(tmp_path / "absent.joblib"), "--name", "iris"), 2, "absent.joblib")


def test_missing_model_or_version_exits_3(published: Cli) -> None:
    """Unknown models, versions and aliases are NotFound (exit 3)."""
    assert_error(published("versions", "nosuch"), 3, "nosuch")
    assert_error(published("pull", "iris:9"), 3, "9")
    assert_error(published("pull", "nosuch:1"), 3, "nosuch")
    assert_error(published("alias", "get", "iris", "canary"), 3, "canary")
    assert_error(published("predict", "iris@canary", "--input", "[[1,2,3,4]]"), 3, "canary")


def test_publishing_an_existing_version_exits_4(published: Cli, artifact: Path) -> None:
    """Versions are immutable: publishing version 1 again is refused."""
    assert_error(
        published("publish", str(artifact), "--name", "iris", "--version", "1"), 4, "iris:1", "immutable"
    )


def test_alias_to_a_missing_version_exits_3(published: Cli) -> None:
    assert_error(published("alias", "set", "iris", "production", "7"), 3, "7")
    assert ok(published("alias", "get", "iris", "production")).stdout.strip() == "1"


@pytest.mark.parametrize("ref", ["iris@", "iris:v:1", "iris@prod:1", "../iris", "@production"])
def test_malformed_reference_exits_2(cli: Cli, ref: str) -> None:
    assert_error(cli("pull", ref), 2)


def test_bad_input_json_exits_2(published: Cli) -> None:
    assert_error(published("predict", "iris", "--input", "[[1,2"), 2, "--input", "JSON")
    assert_error(published("predict", "iris", "--input", json.dumps([[1, 2]])), 2)
    assert_error(published("publish", "x", "--name", "iris", "--metadata", "novalue"), 2, "KEY=VALUE")


def test_invalid_setting_exits_2(cli: Cli) -> None:
    """A malformed SERVING_* variable is a one-line error, not a pydantic dump."""
    assert_error(cli("versions", "iris", env={"SERVING_S3_CONNECT_TIMEOUT": "soon"}), 2, "S3_CONNECT_TIMEOUT")


def test_usage_errors_exit_2_without_traceback(cli: Cli) -> None:
    for args in [(), ("publish", "x"), ("alias",), ("frobnicate",), ("predict", "iris")]:
        result = cli(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr
        assert "usage:" in result.stderr


def test_unreachable_s3_endpoint_exits_9_quickly(tmp_path: Path) -> None:
    """A closed port is StoreUnavailable (exit 9) within the configured timeouts."""
    env = {
        **_clean_env(),
        **MotoS3(port=free_port()).env(),  # an endpoint nobody listens on
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "SERVING_STORE": "s3://models/prefix",
        "SERVING_CACHE_DIR": str(tmp_path / "cache"),
        "SERVING_S3_CONNECT_TIMEOUT": "0.5",
        "SERVING_S3_READ_TIMEOUT": "0.5",
        "SERVING_S3_MAX_ATTEMPTS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "pull", "iris@production"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_error(result, 9, "unreachable")


@pytest.mark.s3
def test_wrong_credentials_exit_9(s3_env: MotoS3, bucket: str, tmp_path: Path, artifact: Path) -> None:
    """Keys the store does not know are StoreAccessDenied (exit 9), named as such."""
    env = {
        **_clean_env(),
        "SERVING_STORE": f"s3://{bucket}/models",
        "SERVING_CACHE_DIR": str(tmp_path / "cache"),
        "SERVING_S3_ADDRESSING_STYLE": "path",
        "SERVING_S3_MAX_ATTEMPTS": "1",
    }
    with s3_env.require_auth():
        result = subprocess.run(
            [sys.executable, "-m", "serving.cli", "publish", str(artifact), "--name", "iris"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert_error(result, 9, "access denied")


# -- the demo publisher (make serve runs it first) ---------------------------------------------
def test_demo_publishes_iris_once_then_next_versions_on_request(cli: Cli, store_uri: str) -> None:
    """--if-empty publishes iris:1 with production only once; --publish-next adds a version
    trained with another C whose probabilities differ, and moves the alias when asked."""

    def demo(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**_clean_env(), "SERVING_STORE": store_uri, "SERVING_S3_ADDRESSING_STYLE": "path"}
        return subprocess.run(
            [sys.executable, "-m", "serving.demo", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    assert "published iris:1" in ok(demo("--if-empty")).stdout
    assert "nothing to do" in ok(demo("--if-empty")).stdout
    v1 = as_json(cli("predict", "iris@production", "--input", json.dumps(EXAMPLE)))
    assert "iris@production -> 2" in ok(demo("--publish-next", "--C", "0.01", "--alias", "production")).stdout
    v2 = as_json(cli("predict", "iris@production", "--input", json.dumps(EXAMPLE)))
    assert (v1["model_version"], v2["model_version"]) == ("1", "2")
    assert v1["outputs"]["predict"] == v2["outputs"]["predict"] == [0]
    assert v1["outputs"]["predict_proba"] != v2["outputs"]["predict_proba"]
    assert_error(demo("--publish-next", "--version", "2"), 4, "iris:2")
