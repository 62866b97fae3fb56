"""``serving import git``: publish a model file or folder from a Git repository at a revision.

Many teams keep the model they ship in Git (often through Git LFS) and tag the commit.
:func:`import_git` fetches that revision into a scratch clone (``git`` itself does the
transport: a local path, ``file://``, ``https://`` or ``ssh://``), checks out only ``path``,
resolves Git LFS pointers through ``git lfs`` when the repository uses it, and publishes the
result as a new version whose manifest records where it came from::

    metadata.source = {"type": "git", "repo": "https://git.example.com/ml/models.git",
                       "rev": "v1.2", "commit": "<40 hex>", "path": "iris/model.joblib"}

Credentials in the URL (``https://user:token@host/...``) are used for the fetch and never
written anywhere: :func:`public_url` strips them from what the manifest records.

Example::

    manifest = import_git(repo, "https://git.example.com/ml/models.git", "v1.2",
                          "iris/model.joblib", name="iris", alias="production")
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from serving.errors import InvalidRequest, StoreUnavailable
from serving.manifest import Manifest
from serving.publish import publish_path
from serving.repository import Repository

__all__ = ["GitSource", "checkout", "import_git", "public_url"]

log = logging.getLogger(__name__)

GIT_TIMEOUT_S = 600.0
"""The most one git command may take (a large LFS download included)."""
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_POINTER_MAX = 1024
"""Git LFS pointer files are about 130 bytes; a file this large or larger is not one."""


@dataclass(frozen=True)
class GitSource:
    """Where a version came from, as its manifest records it (``metadata.source``)."""

    repo: str
    """The repository, with any credentials removed."""
    rev: str
    """What was asked for: a tag, a branch or a commit."""
    commit: str
    """The commit ``rev`` resolved to (40 hex digits)."""
    path: str
    """The file or folder in the repository."""
    lfs: bool = False
    """Whether Git LFS pointers were resolved."""

    def as_metadata(self) -> dict[str, Any]:
        return {"type": "git", **asdict(self)}


def public_url(repo: str) -> str:
    """``repo`` without user name or password (``https://u:token@host/x`` -> ``https://host/x``).

    A local path and an scp-like address (``git@host:org/repo.git``, which carries no secret)
    are returned as they are.
    """
    parts = urlsplit(repo)
    if not parts.scheme or not parts.netloc or "@" not in parts.netloc:
        return repo
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _git(args: list[str], cwd: Path, what: str, env: dict[str, str]) -> str:
    try:
        done = subprocess.run(
            # NOTE: no transport that runs a command (ext::), whatever a user config allows.
            ["git", "-c", "protocol.ext.allow=never", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise InvalidRequest("git is not installed (the 'git' command was not found)") from exc
    except subprocess.TimeoutExpired as exc:
        raise StoreUnavailable(f"{what}: git took more than {GIT_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no message)"]
        # NOTE: git's first "fatal:" line says what went wrong; the lines after it are advice.
        reason = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[-1])
        raise InvalidRequest(f"{what}: {reason}")
    return done.stdout


def _env() -> dict[str, str]:
    # NOTE: never ask on a terminal for credentials (a CLI in CI would hang); no system or user
    # config may point the fetch elsewhere (url.*.insteadOf) than what was asked for.
    return {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "true",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_LFS_SKIP_SMUDGE": "1",
    }


def _pointers(root: Path) -> list[Path]:
    """The Git LFS pointer files under ``root`` (a file or a folder)."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    found = []
    for f in files:
        if f.stat().st_size < _POINTER_MAX:
            with f.open("rb") as fh:
                if fh.read(len(_LFS_POINTER)) == _LFS_POINTER:
                    found.append(f)
    return found


def _fetch(repo: str, rev: str, work: Path, where: str, env: dict[str, str]) -> str:
    """Fetch ``rev`` of ``repo`` into ``work``; the commit it names."""
    try:
        # NOTE: a tag, a branch or a full commit id: fetch exactly it, with no history or other refs.
        _git(["fetch", "--quiet", "--depth=1", "--no-tags", "--", repo, rev], work, "fetch", env)
        return _git(["rev-parse", "--verify", "FETCH_HEAD^{commit}"], work, "rev-parse", env).strip()
    except InvalidRequest as exc:
        first = exc
    # NOTE: an abbreviated commit id cannot be fetched by name: fetch every branch and tag.
    refspecs = ["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"]
    try:
        _git(["fetch", "--quiet", "--", repo, *refspecs], work, "fetch", env)
    except InvalidRequest as exc:
        raise InvalidRequest(f"cannot fetch {rev!r} from {where}: {exc.message}") from None
    try:
        return _git(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], work, "rev-parse", env).strip()
    except InvalidRequest:
        raise InvalidRequest(f"cannot fetch {rev!r} from {where}: {first.message}") from None


@contextmanager
def checkout(repo: str, rev: str, path: str) -> Iterator[tuple[Path, GitSource]]:
    """``path`` of ``repo`` at ``rev``, in a scratch folder removed on exit; and its :class:`GitSource`.

    Raises:
        InvalidRequest: git failed (no such repository, revision or path; a refused login), a
            path that leaves the repository, or an LFS file with no ``git lfs`` to fetch it.
        StoreUnavailable: git ran past :data:`GIT_TIMEOUT_S`.
    """
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts or "\x00" in path or parts[0] == ".git":
        raise InvalidRequest(
            f"invalid path {path!r}: give a file or folder relative to the repository's root"
        )
    path = str(PurePosixPath(*parts))
    if not rev or rev.startswith("-"):
        raise InvalidRequest(f"invalid revision {rev!r}")
    env = _env()
    where = public_url(repo)
    scratch = Path(tempfile.mkdtemp(prefix="serving-git-"))
    try:
        work = scratch / "repo"
        work.mkdir()
        _git(["init", "--quiet"], work, "git init", env)
        commit = _fetch(repo, rev, work, where, env)
        listed = _git(["ls-tree", "--name-only", commit, "--", path], work, "ls-tree", env)
        if not listed.strip():
            raise InvalidRequest(f"{where} has no {path!r} at {rev} ({commit[:12]})")
        _git(["checkout", "--quiet", commit, "--", path], work, f"cannot check out {path!r}", env)
        target = work / path
        lfs = False
        if _pointers(target):
            if shutil.which("git-lfs") is None:
                raise InvalidRequest(
                    f"{path!r} at {rev} is stored in Git LFS, and git-lfs is not installed here"
                )
            _git(["remote", "add", "origin", repo], work, "git remote", env)
            # NOTE: git lfs checks out against HEAD; point it at the commit (no other file moves),
            # with LFS's filters configured in this scratch repository only.
            _git(["update-ref", "--no-deref", "HEAD", commit], work, "update-ref", env)
            _git(["lfs", "install", "--local"], work, "git lfs install", env)
            what = f"cannot fetch the Git LFS files of {path!r}"
            _git(["lfs", "fetch", "--include", path, "origin", commit], work, what, env)
            _git(["lfs", "checkout", path], work, what, env)
            left = _pointers(target)
            if left:
                raise InvalidRequest(
                    f"{left[0].relative_to(work)} is still a Git LFS pointer after 'git lfs fetch' "
                    f"(is the object on the LFS server?)"
                )
            lfs = True
        yield target, GitSource(where, rev, commit, path, lfs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def import_git(
    repo: Repository, url: str, rev: str, path: str, *, name: str, **publish: Any
) -> tuple[Manifest, GitSource]:
    """Publish ``path`` of ``url`` at ``rev`` as a new version of ``name``; the manifest and source.

    ``publish`` takes :func:`serving.publish.publish_path`'s keywords (``version``,
    ``format``, ``alias``, ``example``, ``signing_key``, ...); ``metadata`` is kept and
    ``source`` is set to the Git source.
    """
    with checkout(url, rev, path) as (target, source):
        metadata = {**(publish.pop("metadata", None) or {}), "source": source.as_metadata()}
        manifest = publish_path(repo, target, name, metadata=metadata, **publish)
    log.info("imported %s@%s:%s as %s:%s", source.repo, rev, path, manifest.name, manifest.version)
    return manifest, source
