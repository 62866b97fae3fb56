"""``serving import dvc`` against real DVC repositories made in the test: a local remote, and an S3
remote on the moto server. Each remote is the only copy of the bytes (the repository's DVC cache is
removed after the push), so what is published is what the remote sent."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from cli_runner import run_cli
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.cache import LoaderCache
from serving.formats import load_predictor
from serving.manifest import ModelRef
from serving.repository import Repository
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.testing import MotoS3
from serving.trust import check_trust

pytest.importorskip("dvc.api", reason="the dvc extra is not installed")

X, Y = load_iris(return_X_y=True)


def run(cwd: Path, *args: str) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout.strip()


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args)


def dvc(cwd: Path, *args: str) -> str:
    return run(cwd, sys.executable, "-m", "dvc", *args)


def _commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()  # NOTE: DVC's object name


def make_repo(root: Path, remote: list[str], **settings: str) -> dict[str, object]:
    """models/iris.joblib and models/bundle/ tracked by DVC: v1 tagged, branch ``exp`` with another
    model; pushed to ``remote`` (``dvc remote add`` arguments, then ``settings`` for
    ``dvc remote modify``), then the local DVC cache removed."""
    repo = root / "models-repo"
    (repo / "models" / "bundle").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "remote", "add", "-d", *remote)
    for key, value in settings.items():
        dvc(repo, "remote", "modify", remote[0], key, value)
    models = {"v1": LogisticRegression(max_iter=500, C=1.0).fit(X, Y)}
    joblib.dump(models["v1"], repo / "models" / "iris.joblib")
    joblib.dump(models["v1"], repo / "models" / "bundle" / "model.joblib")
    (repo / "models" / "bundle" / "README").write_text("the iris model\n")
    dvc(repo, "add", "-q", "models/iris.joblib", "models/bundle")
    md5 = {"v1": _md5(repo / "models" / "iris.joblib")}
    commits = {"v1": _commit(repo, "iris v1")}
    git(repo, "tag", "v1")
    dvc(repo, "push")
    git(repo, "checkout", "-q", "-b", "exp")
    models["exp"] = LogisticRegression(max_iter=500, C=0.01).fit(X, Y)
    joblib.dump(models["exp"], repo / "models" / "iris.joblib")
    dvc(repo, "add", "-q", "models/iris.joblib")
    md5["exp"] = _md5(repo / "models" / "iris.joblib")
    commits["exp"] = _commit(repo, "iris experiment")
    dvc(repo, "push", "-q")
    git(repo, "checkout", "-q", "main")
    shutil.rmtree(repo / ".dvc" / "cache")  # NOTE: the remote is the only copy
    return {"repo": repo, "models": models, "md5": md5, "commits": commits}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setenv("SERVING_STORE", str(root))
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SERVING_PROGRESS", "false")
    return root


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    """One repository and local remote per module (DVC's CLI takes seconds per command); each test
    gets a copy. The remote's path is relative, so the copy's repository reads the copy's remote."""
    root = tmp_path_factory.mktemp("dvc-template")
    return root, make_repo(root, ["local", "../dvc-remote"])


@pytest.fixture
def local(template: tuple[Path, dict[str, object]], tmp_path: Path) -> dict[str, object]:
    root, source = template
    copy = tmp_path / "dvc"
    shutil.copytree(root, copy, symlinks=True)
    return {**source, "repo": copy / "models-repo", "remote": copy / "dvc-remote"}


def _object(remote: Path, md5: str) -> Path:
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def _predicts_like(store: Path, tmp_path: Path, version: str, model: LogisticRegression) -> None:
    repo = Repository(LocalStore(str(store)))
    cache = LoaderCache(tmp_path / "check-cache", 1 << 30)
    resolved, _ = cache.resolve(repo, ModelRef.parse(f"iris:{version}"))
    trust = check_trust(repo, resolved, Settings(store=str(store)), cache_root=cache.root)
    cached = cache.fetch(repo, resolved)
    predictor = load_predictor(cached.path, cached.manifest, trust.policy)
    got = predictor.predict({predictor.inputs[0].name: X})
    np.testing.assert_array_equal(got["predict"], model.predict(X))


def _import(capsys: pytest.CaptureFixture[str], repo: object, path: str, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "--json", "import", "dvc", str(repo), path, "--name", "iris", *args)


@pytest.mark.parametrize("rev", ["v1", "exp"])
def test_a_tag_or_a_branch_is_read_from_the_local_remote_with_its_md5(
    local: dict[str, object], store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rev: str
) -> None:
    code, out, err = _import(
        capsys, local["repo"], "models/iris.joblib", "--rev", rev, "--alias", "production"
    )
    assert code == 0, err
    source = json.loads(out)["source"]
    md5 = local["md5"][rev]  # type: ignore[index]
    assert source == {
        "type": "dvc",
        "repo": str(local["repo"]),
        "rev": rev,
        "commit": local["commits"][rev],  # type: ignore[index]
        "path": "models/iris.joblib",
        "output": "models/iris.joblib",
        "md5": md5,
        "hash": "md5",
        "remote": "local",
    }
    repo = Repository(LocalStore(str(store)))
    assert repo.get_alias("iris", "production").version == "1"
    manifest, _ = repo.manifest("iris", "1")
    assert manifest.metadata["source"] == source
    # NOTE: the published bytes are the ones whose md5 Git records
    assert hashlib.sha256(_object(local["remote"], md5).read_bytes()).hexdigest() == manifest.files[0].sha256  # type: ignore[arg-type]
    _predicts_like(store, tmp_path, "1", local["models"][rev])  # type: ignore[index]
    code, out, _ = run_cli(capsys, "--json", "versions", "iris")
    assert code == 0
    assert json.loads(out)["versions"][0]["source"]["md5"] == md5


def test_a_file_inside_a_tracked_folder_is_checked_through_the_folders_listing(
    local: dict[str, object], store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _import(capsys, local["repo"], "models/bundle/model.joblib", "--rev", "v1")
    assert code == 0, err
    source = json.loads(out)["source"]
    assert source["output"] == "models/bundle"
    assert source["md5"].endswith(".dir")
    _predicts_like(store, tmp_path, "1", local["models"]["v1"])  # type: ignore[index]


def test_a_corrupt_remote_is_refused_and_publishes_nothing(
    local: dict[str, object], store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = _object(local["remote"], local["md5"]["v1"])  # type: ignore[arg-type, index]
    stored.chmod(0o644)
    evil = LogisticRegression(max_iter=500, C=0.001).fit(X, Y)
    joblib.dump(evil, stored)  # NOTE: a valid model, just not the one Git records
    code, _, err = _import(capsys, local["repo"], "models/iris.joblib", "--rev", "v1")
    assert code != 0
    assert "refusing a corrupt remote" in err, err
    assert local["md5"]["v1"] in err  # type: ignore[operator, index]
    assert Repository(LocalStore(str(store))).list_versions("iris") == []


def _tamper_listing(local: dict[str, object], tmp_path: Path) -> tuple[Path, str]:
    """Rewrite models/bundle's listing on the remote to name another file; the listing and its old text."""
    repo = local["repo"]
    assert isinstance(repo, Path)
    recorded = next(
        line for line in (repo / "models" / "bundle.dvc").read_text().splitlines() if "md5:" in line
    )
    listing_file = _object(local["remote"], recorded.split("md5:")[1].strip())  # type: ignore[arg-type]
    original = listing_file.read_text()
    listing = json.loads(original)
    listing.append({"md5": listing[0]["md5"], "relpath": "../../escape.joblib"})
    listing_file.chmod(0o644)
    listing_file.write_text(json.dumps(listing))
    return listing_file, original


def test_a_listing_that_leaves_its_folder_is_one_line_and_not_remembered_once_repaired(
    local: dict[str, object], store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing_file, original = _tamper_listing(local, tmp_path)
    code, _, err = _import(capsys, local["repo"], "models/bundle/model.joblib", "--rev", "v1")
    assert code != 0
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err  # NOTE: no traceback
    assert "Traceback" not in err
    listing_file.write_text(original)  # NOTE: the remote is repaired; nothing of the bad listing stays
    code, _, err = _import(capsys, local["repo"], "models/bundle/model.joblib", "--rev", "v1")
    assert code == 0, err


def test_a_remote_object_larger_than_git_records_is_cut_off(
    local: dict[str, object], store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = _object(local["remote"], local["md5"]["v1"])  # type: ignore[arg-type, index]
    stored.chmod(0o644)
    with stored.open("ab") as f:
        f.write(b"\0" * (4 << 20))
    code, _, err = _import(capsys, local["repo"], "models/iris.joblib", "--rev", "v1")
    assert code != 0
    assert "sent more than the" in err, err
    assert Repository(LocalStore(str(store))).list_versions("iris") == []


def test_a_path_two_dvc_files_claim_is_refused(
    local: dict[str, object], store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = local["repo"]
    assert isinstance(repo, Path)
    claim = (repo / "models" / "iris.joblib.dvc").read_text()
    (repo / "models" / "other.dvc").write_text(claim.replace("path: iris.joblib", "path: iris.joblib"))
    _commit(repo, "a second claim")
    git(repo, "tag", "v2")
    code, _, err = _import(capsys, repo, "models/iris.joblib", "--rev", "v2")
    assert code != 0
    assert "claimed by more than one DVC file" in err, err


def test_a_url_import_leaves_no_clone_and_no_credential_behind(
    local: dict[str, object],
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scratch = tmp_path / "scratch-tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    repo = local["repo"]
    assert isinstance(repo, Path)
    # NOTE: a repository fetched from a URL resolves a relative remote from the clone: make it absolute
    dvc(repo, "remote", "modify", "local", "url", str(local["remote"]))
    _commit(repo, "absolute remote")
    git(repo, "tag", "v1-abs")
    url = f"file://alice:TOKEN123@localhost{repo}"
    code, out, err = _import(capsys, url, "models/iris.joblib", "--rev", "v1-abs")
    assert code == 0, err
    assert json.loads(out)["source"]["repo"] == f"file://localhost{local['repo']}"
    assert list(scratch.iterdir()) == []  # NOTE: no clone, no DVC cache left in the temporary folder
    assert "TOKEN123" not in out + err


def test_a_tampered_folder_listing_is_refused(
    local: dict[str, object], store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The remote holds a folder's listing too: an attacker who controls the remote rewrites the
    listing so that it names their file, with their file's md5."""
    repo = local["repo"]
    assert isinstance(repo, Path)
    recorded = next(
        line for line in (repo / "models" / "bundle.dvc").read_text().splitlines() if "md5:" in line
    )
    dir_md5 = recorded.split("md5:")[1].strip()
    listing_file = _object(local["remote"], dir_md5)  # type: ignore[arg-type]
    listing = json.loads(listing_file.read_text())
    evil = tmp_path / "evil.joblib"
    joblib.dump(LogisticRegression(max_iter=500, C=0.001).fit(X, Y), evil)
    evil_md5 = _md5(evil)
    target = _object(local["remote"], evil_md5)  # type: ignore[arg-type]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(evil, target)  # NOTE: stored as DVC stores it, under its own md5
    for entry in listing:
        if entry["relpath"] == "model.joblib":
            entry["md5"] = evil_md5
    listing_file.chmod(0o644)
    listing_file.write_text(json.dumps(listing))
    code, _, err = _import(capsys, repo, "models/bundle/model.joblib", "--rev", "v1")
    assert code != 0
    assert "listing of 'models/bundle'" in err, err
    assert "refusing a corrupt remote" in err
    assert Repository(LocalStore(str(store))).list_versions("iris") == []


@pytest.mark.parametrize(
    ("rev", "path", "needle"),
    [
        ("v1", "models/nope.joblib", "has no 'models/nope.joblib' at v1"),
        ("v9", "models/iris.joblib", "has no revision 'v9'"),
        ("v1", "models/iris.joblib.dvc", "is not tracked by DVC"),
        ("v1", "../etc/passwd", "invalid path"),
        ("v1", ".dvc/config", "invalid path"),
        ("--upload-pack=touch /tmp/x", "models/iris.joblib", "invalid revision"),
    ],
)
def test_a_bad_revision_or_path_is_one_line_and_publishes_nothing(
    local: dict[str, object],
    store: Path,
    capsys: pytest.CaptureFixture[str],
    rev: str,
    path: str,
    needle: str,
) -> None:
    code, _, err = run_cli(
        capsys, "import", "dvc", str(local["repo"]), path, f"--rev={rev}", "--name", "iris"
    )
    assert code != 0
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert needle in lines[0], err
    assert Repository(LocalStore(str(store))).list_versions("iris") == []


def test_a_remote_that_lost_the_object_is_a_clear_error(
    local: dict[str, object], store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _object(local["remote"], local["md5"]["v1"]).unlink()  # type: ignore[arg-type, index]
    code, _, err = run_cli(
        capsys, "import", "dvc", str(local["repo"]), "models/iris.joblib", "--rev", "v1", "--name", "iris"
    )
    assert code != 0
    assert len([line for line in err.splitlines() if ": error: " in line]) == 1, err
    assert "models/iris.joblib" in err
    assert Repository(LocalStore(str(store))).list_versions("iris") == []


def test_an_s3_remote_on_the_moto_server(
    s3_env: MotoS3,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # NOTE: s3_env cleared SERVING_*: the store is a folder, the DVC remote is the bucket
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("SERVING_STORE", str(store))
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SERVING_PROGRESS", "false")
    # NOTE: s3_env aims AWS's config files at /dev/null, which aiobotocore refuses as "not found"
    empty = tmp_path / "aws-config"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    source = make_repo(tmp_path, ["s3", f"s3://{bucket}/dvc"], endpointurl=s3_env.endpoint_url)
    repo = source["repo"]
    md5 = source["md5"]["v1"]  # type: ignore[index]
    key = f"dvc/files/md5/{md5[:2]}/{md5[2:]}"
    s3_env.client().head_object(Bucket=bucket, Key=key)  # NOTE: the push reached the bucket

    code, out, err = _import(capsys, repo, "models/iris.joblib", "--rev", "v1", "--remote", "s3")
    assert code == 0, err
    reply = json.loads(out)
    assert reply["source"]["md5"] == md5
    assert reply["source"]["remote"] == "s3"
    _predicts_like(store, tmp_path, "1", source["models"]["v1"])  # type: ignore[index]

    s3_env.client().put_object(Bucket=bucket, Key=key, Body=b"not the model")
    code, _, err = _import(capsys, repo, "models/iris.joblib", "--rev", "v1")
    assert code != 0
    assert "refusing a corrupt remote" in err, err
    assert Repository(LocalStore(str(store))).list_versions("iris") == ["1"]
