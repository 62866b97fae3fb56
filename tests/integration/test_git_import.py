"""``serving import git`` against real Git repositories made in the test (and Git LFS when installed)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import joblib
import numpy as np
import pytest
from cli_runner import run_cli
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.cache import LoaderCache
from serving.formats import load_predictor
from serving.git_import import public_url
from serving.manifest import ModelRef
from serving.repository import Repository
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.trust import check_trust

X, Y = load_iris(return_X_y=True)


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def source(tmp_path: Path) -> dict[str, object]:
    """A repository with models/iris.joblib: v1 tagged, a branch ``exp`` with another model, main moved on."""
    repo = tmp_path / "models-repo"
    (repo / "models").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    models = {}
    models["v1"] = LogisticRegression(max_iter=500, C=1.0).fit(X, Y)
    joblib.dump(models["v1"], repo / "models" / "iris.joblib")
    (repo / "README").write_text("models\n")
    v1 = _commit(repo, "iris v1")
    git(repo, "tag", "v1")
    git(repo, "checkout", "-q", "-b", "exp")
    models["exp"] = LogisticRegression(max_iter=500, C=0.01).fit(X, Y)
    joblib.dump(models["exp"], repo / "models" / "iris.joblib")
    exp = _commit(repo, "iris experiment")
    git(repo, "checkout", "-q", "main")
    (repo / "README").write_text("models, later\n")
    later = _commit(repo, "docs")
    return {"repo": repo, "models": models, "v1": v1, "exp": exp, "main": later}


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setenv("SERVING_STORE", str(root))
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SERVING_PROGRESS", "false")
    return root


def _predicts_like(store: Path, tmp_path: Path, version: str, model: LogisticRegression) -> None:
    repo = Repository(LocalStore(str(store)))
    cache = LoaderCache(tmp_path / "check-cache", 1 << 30)
    resolved, _ = cache.resolve(repo, ModelRef.parse(f"iris:{version}"))
    trust = check_trust(repo, resolved, Settings(store=str(store)), cache_root=cache.root)
    cached = cache.fetch(repo, resolved)
    predictor = load_predictor(cached.path, cached.manifest, trust.policy)
    got = predictor.predict({predictor.inputs[0].name: X})
    np.testing.assert_array_equal(got["predict"], model.predict(X))


@pytest.mark.parametrize("rev", ["v1", "exp", "full-commit", "short-commit"])
def test_a_tag_a_branch_or_a_commit_is_published_with_its_source(
    source: dict[str, object], store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], rev: str
) -> None:
    which = "exp" if rev == "exp" else "v1"
    commit = str(source[which])
    asked = {"full-commit": commit, "short-commit": commit[:10]}.get(rev, rev)
    code, out, err = run_cli(
        capsys,
        "--json",
        "import",
        "git",
        str(source["repo"]),
        "--rev",
        asked,
        "--path",
        "models/iris.joblib",
        "--name",
        "iris",
        "--alias",
        "production",
    )
    assert code == 0, err
    reply = json.loads(out)
    expected = {"type": "git", "repo": str(source["repo"]), "rev": asked, "commit": commit}
    assert {k: reply["source"][k] for k in expected} == expected
    assert reply["source"]["path"] == "models/iris.joblib"
    repo = Repository(LocalStore(str(store)))
    assert repo.get_alias("iris", "production").version == reply["version"] == "1"
    manifest, _ = repo.manifest("iris", "1")
    assert manifest.metadata["source"] == reply["source"]
    _predicts_like(store, tmp_path, "1", source["models"][which])  # type: ignore[index]
    code, out, _ = run_cli(capsys, "--json", "versions", "iris")
    assert code == 0
    assert json.loads(out)["versions"][0]["source"]["commit"] == commit


@pytest.mark.parametrize(
    ("rev", "path", "needle"),
    [
        ("v1", "models/nope.joblib", "has no 'models/nope.joblib' at v1"),
        ("v9", "models/iris.joblib", "cannot fetch 'v9'"),
        ("v1", "../etc/passwd", "invalid path"),
        ("v1", ".git/config", "invalid path"),
        ("--upload-pack=touch /tmp/x", "models/iris.joblib", "invalid revision"),
    ],
)
def test_a_bad_revision_or_path_is_one_line_and_publishes_nothing(
    source: dict[str, object],
    store: Path,
    capsys: pytest.CaptureFixture[str],
    rev: str,
    path: str,
    needle: str,
) -> None:
    code, _, err = run_cli(
        capsys, "import", "git", str(source["repo"]), f"--rev={rev}", "--path", path, "--name", "iris"
    )
    assert code != 0
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert needle in lines[0], err
    assert Repository(LocalStore(str(store))).list_versions("iris") == []


def test_a_missing_repository_is_a_clear_error(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys,
        "import",
        "git",
        str(tmp_path / "nothing"),
        "--rev",
        "v1",
        "--path",
        "m.joblib",
        "--name",
        "iris",
    )
    assert code != 0
    assert "cannot fetch 'v1' from" in err


def test_credentials_never_reach_the_manifest() -> None:
    assert (
        public_url("https://user:s3cret@git.example.com/ml/models.git")
        == "https://git.example.com/ml/models.git"
    )
    assert (
        public_url("https://token@git.example.com:8443/x.git?y=1") == "https://git.example.com:8443/x.git?y=1"
    )
    assert public_url("ssh://git@host/org/repo.git") == "ssh://host/org/repo.git"
    assert public_url("git@github.com:org/repo.git") == "git@github.com:org/repo.git"
    assert public_url("/srv/git/models") == "/srv/git/models"


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")
def test_a_git_lfs_file_is_resolved_to_its_bytes(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "lfs-repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "lfs", "install", "--local")
    git(repo, "lfs", "track", "*.joblib")
    model = LogisticRegression(max_iter=500).fit(X, Y)
    joblib.dump(model, repo / "iris.joblib")
    commit = _commit(repo, "iris in LFS")
    stored = subprocess.run(["git", "show", "HEAD:iris.joblib"], cwd=repo, capture_output=True, check=True)
    assert stored.stdout.startswith(b"version https://git-lfs.github.com/spec/v1")  # NOTE: a pointer in Git
    code, out, err = run_cli(
        capsys,
        "--json",
        "import",
        "git",
        str(repo),
        "--rev",
        "main",
        "--path",
        "iris.joblib",
        "--name",
        "iris",
    )
    assert code == 0, err
    reply = json.loads(out)
    assert reply["source"]["lfs"] is True
    assert reply["source"]["commit"] == commit
    _predicts_like(store, tmp_path, "1", model)


def test_the_callers_git_environment_never_points_the_import_at_its_own_repository(
    source: dict[str, object],
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GIT_DIR and GIT_WORK_TREE, as a git hook or a CI step sets them, would have made every
    git command of the import run in the caller's checkout (a reviewer's case)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    git(victim, "init", "-q", "-b", "main")
    (victim / "models").mkdir()
    (victim / "models" / "iris.joblib").write_bytes(b"mine")
    head = _commit(victim, "mine")
    monkeypatch.setenv("GIT_DIR", str(victim / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(victim))
    monkeypatch.setenv("GIT_INDEX_FILE", str(victim / ".git" / "index"))
    code, _, err = run_cli(
        capsys,
        "import",
        "git",
        str(source["repo"]),
        "--rev",
        "v1",
        "--path",
        "models/iris.joblib",
        "--name",
        "iris",
    )
    assert code == 0, err
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name)
    assert (victim / "models" / "iris.joblib").read_bytes() == b"mine"
    assert git(victim, "rev-parse", "HEAD") == head
    assert git(victim, "status", "--porcelain") == ""
    assert git(victim, "remote") == ""
    assert not (victim / ".git" / "FETCH_HEAD").exists()  # NOTE: nothing was fetched into it


def test_the_published_bytes_are_the_commits_whatever_gitattributes_say(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "crlf-repo"
    (repo / "m").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "m" / ".gitattributes").write_text("* text eol=crlf\n")
    model = LogisticRegression(max_iter=500).fit(X, Y)
    joblib.dump(model, repo / "m" / "iris.joblib")
    _commit(repo, "model with line-ending rules")
    blob = subprocess.run(
        ["git", "show", "HEAD:m/iris.joblib"], cwd=repo, capture_output=True, check=True
    ).stdout
    code, _, err = run_cli(
        capsys, "import", "git", str(repo), "--rev", "main", "--path", "m/iris.joblib", "--name", "iris"
    )
    assert code == 0, err
    manifest, _ = Repository(LocalStore(str(store))).manifest("iris", "1")
    assert [f.sha256 for f in manifest.files] == [hashlib.sha256(blob).hexdigest()]


@pytest.mark.parametrize("path", ["link.joblib", "m"])
def test_a_symbolic_link_is_refused_not_followed(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str
) -> None:
    repo = tmp_path / "link-repo"
    (repo / "m").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    joblib.dump(LogisticRegression(max_iter=500).fit(X, Y), repo / "m" / "iris.joblib")
    (repo / "link.joblib").symlink_to("/etc/passwd")
    (repo / "m" / "escape").symlink_to("../..")
    _commit(repo, "links")
    code, _, err = run_cli(
        capsys, "import", "git", str(repo), "--rev", "main", "--path", path, "--name", "iris"
    )
    assert code != 0
    assert "is a symbolic link" in err
    assert Repository(LocalStore(str(store))).list_versions("iris") == []


def test_no_token_survives_in_a_recorded_url() -> None:
    assert public_url("https://u:p#q?r@git.example.com/x.git") == "https://git.example.com/x.git"
    assert public_url("https://u:t@[::1]:8443/x.git") == "https://[::1]:8443/x.git"
