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

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from serving.errors import InvalidRequest, StoreUnavailable
from serving.fileio import hash_file
from serving.manifest import Manifest
from serving.publish import publish_path
from serving.repository import Repository

__all__ = [
    "GitSource",
    "check_rev",
    "checkout",
    "fetch_revision",
    "git_env",
    "import_git",
    "init_repository",
    "public_url",
    "redact",
    "repo_path",
]

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


_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
"""``scheme://user:password@`` in a URL or a message (a password may hold ``#`` or ``?``)."""
_KEEP_GIT_ENV = frozenset(
    {"GIT_SSH", "GIT_SSH_COMMAND", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "GIT_PROXY_COMMAND", "GIT_TRACE"}
)
"""The caller's GIT_* variables that only say how to reach a server; every other one (GIT_DIR,
GIT_WORK_TREE, GIT_INDEX_FILE, ...) would point git at another repository than the scratch one."""
_REV = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


def repo_path(path: str) -> str:
    """``path`` normalized (``a//b/`` -> ``a/b``); InvalidRequest unless it stays inside a repository."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts or "\x00" in path or parts[0] in (".git", ".dvc"):
        raise InvalidRequest(
            f"invalid path {path!r}: give a file or folder relative to the repository's root"
        )
    return str(PurePosixPath(*parts))


def check_rev(rev: str) -> None:
    """InvalidRequest unless ``rev`` reads as a tag, branch or commit (never an option or a range)."""
    if not _REV.fullmatch(rev) or ".." in rev or rev.endswith((".lock", "/", ".")):
        raise InvalidRequest(f"invalid revision {rev!r}: give a tag, a branch or a commit")


def public_url(repo: str) -> str:
    """``repo`` without user name or password (``https://u:token@host/x`` -> ``https://host/x``).

    A local path and an scp-like address (``git@host:org/repo.git``, which carries no secret)
    are returned as they are.
    """
    return _CREDENTIALS.sub(r"\1", repo, count=1)


def redact(text: str) -> str:
    """``text`` with any ``scheme://user:password@`` reduced to ``scheme://``."""
    return _CREDENTIALS.sub(r"\1", text)


def _git(args: list[str], cwd: Path, what: str, env: dict[str, str], *, binary: bool = False) -> Any:
    """Run git in ``cwd``; its output (bytes with ``binary``), or InvalidRequest with git's reason."""
    try:
        proc = subprocess.Popen(
            # NOTE: no transport that runs a command (ext::), whatever a user config allows.
            ["git", "-c", "protocol.ext.allow=never", "-c", "core.autocrlf=false", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # NOTE: its own group, so a timeout also ends what it started (ssh, a credential helper).
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise InvalidRequest("git is not installed (the 'git' command was not found)") from exc
    try:
        out, err = proc.communicate(timeout=GIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise StoreUnavailable(f"{what}: git took more than {GIT_TIMEOUT_S:g} s") from None
    except BaseException:
        _kill(proc)  # NOTE: Ctrl-C or SIGTERM: git and what it started end with us
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or ["(no message)"]
        # NOTE: git's first "fatal:" line says what went wrong; the lines after it are advice.
        reason = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[-1])
        raise InvalidRequest(redact(f"{what}: {reason}"))
    return out if binary else out.decode(errors="replace")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def git_env() -> dict[str, str]:
    """The environment git runs in: no prompt, no system config, none of the caller's GIT_DIR and the like."""
    # NOTE: never ask on a terminal for credentials (a CLI in CI would hang), and no system
    # config; the user's own (credential helpers, url.*.insteadOf) still applies.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_") or k in _KEEP_GIT_ENV}
    return env | {
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "true",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_LFS_SKIP_SMUDGE": "1",
        "GIT_LITERAL_PATHSPECS": "1",
    }


def init_repository(work: Path, env: dict[str, str]) -> None:
    """``git init`` in ``work``: InvalidRequest when git is missing or fails, StoreUnavailable on a hang."""
    _git(["init", "--quiet"], work, "git init", env)


def fetch_revision(repo: str, rev: str, work: Path, where: str, env: dict[str, str]) -> str:
    """Fetch ``rev`` of ``repo`` into the git repository ``work``; the commit it names."""
    try:
        # NOTE: a tag, a branch or a full commit id: fetch exactly it, with no history or other refs.
        _git(["fetch", "--quiet", "--depth=1", "--no-tags", "--", repo, rev], work, "fetch", env)
        return str(_git(["rev-parse", "--verify", "FETCH_HEAD^{commit}"], work, "rev-parse", env)).strip()
    except InvalidRequest as exc:
        first = exc
    # NOTE: an abbreviated commit id cannot be fetched by name: fetch every branch and tag.
    refspecs = ["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"]
    try:
        _git(["fetch", "--quiet", "--", repo, *refspecs], work, "fetch", env)
    except InvalidRequest as exc:
        raise InvalidRequest(f"cannot fetch {rev!r} from {where}: {exc.message}") from None
    for candidate in (f"{rev}^{{commit}}", f"refs/remotes/origin/{rev}^{{commit}}"):
        try:
            return str(_git(["rev-parse", "--verify", "--quiet", candidate], work, "rev-parse", env)).strip()
        except InvalidRequest:
            continue
    raise InvalidRequest(f"cannot fetch {rev!r} from {where}: {first.message} (nor a commit it abbreviates)")


def _extract(work: Path, commit: str, path: str, where: str, rev: str, env: dict[str, str]) -> Path:
    """The blobs of ``path`` at ``commit``, written byte for byte under ``work/out``.

    Not ``git checkout``: the repository's ``.gitattributes`` (line endings, filters) and the
    user's ``core.autocrlf`` would change the bytes, and the manifest says they are the commit's.
    """
    listed = _git(["ls-tree", "-r", "-z", "--full-tree", commit, "--", path], work, "ls-tree", env)
    entries = [e for e in str(listed).split("\0") if e]
    if not entries:
        raise InvalidRequest(f"{where} has no {path!r} at {rev} ({commit[:12]})")
    out = work / "out"
    for entry in entries:
        meta, _, name = entry.partition("\t")
        mode, kind, blob = meta.split()
        if kind == "commit":
            raise InvalidRequest(f"{name!r} at {rev} is a submodule: import from its own repository")
        if mode == "120000":
            raise InvalidRequest(f"{name!r} at {rev} is a symbolic link: publish the file it points to")
        parts = PurePosixPath(name).parts
        if kind != "blob" or ".." in parts or not (name == path or name.startswith(path + "/")):
            raise InvalidRequest(f"unexpected entry {name!r} in {path!r} at {rev}")
        target = out.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_git(["cat-file", "blob", blob], work, "cat-file", env, binary=True))
    return out.joinpath(*PurePosixPath(path).parts)


def _pointer(file: Path) -> tuple[str, int] | None:
    """The (sha256, size) a Git LFS pointer file names, or None for any other file."""
    if file.stat().st_size >= _POINTER_MAX:
        return None
    text = file.read_bytes()
    if not text.startswith(_LFS_POINTER):
        return None
    fields = dict(line.split(" ", 1) for line in text.decode(errors="replace").splitlines() if " " in line)
    oid, size = fields.get("oid", ""), fields.get("size", "")
    if not oid.startswith("sha256:") or len(oid) != 71 or not size.isdigit():
        raise InvalidRequest(f"{file.name} is a malformed Git LFS pointer")
    return oid.removeprefix("sha256:"), int(size)


def _resolve_lfs(
    work: Path, target: Path, repo: str, commit: str, path: str, rev: str, env: dict[str, str]
) -> bool:
    """Replace Git LFS pointers under ``target`` with their objects, checked by digest; whether any."""
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    pointers = {f: ptr for f in files if (ptr := _pointer(f)) is not None}
    if not pointers:
        return False
    if shutil.which("git-lfs") is None:
        raise InvalidRequest(f"{path!r} at {rev} is stored in Git LFS, and git-lfs is not installed here")
    what = f"cannot fetch the Git LFS files of {path!r}"
    _git(["remote", "add", "origin", repo], work, what, env)
    _git(["lfs", "fetch", "--include", path, "origin", commit], work, what, env)
    for file, (oid, size) in pointers.items():
        stored = work / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        if not stored.is_file():
            raise InvalidRequest(f"{what}: the LFS server did not send {oid[:12]}")
        got_size, digest = hash_file(stored, size)
        if digest != oid or got_size != size:
            raise InvalidRequest(f"{what}: the LFS object {oid[:12]} does not match its pointer")
        shutil.copyfile(stored, file)
    return True


@contextmanager
def checkout(repo: str, rev: str, path: str) -> Iterator[tuple[Path, GitSource]]:
    """``path`` of ``repo`` at ``rev``, in a scratch folder removed on exit; and its :class:`GitSource`.

    Raises:
        InvalidRequest: git failed (no such repository, revision or path; a refused login), a
            path that leaves the repository, a symlink or submodule, or an LFS file with no
            ``git lfs`` to fetch it or whose object does not match.
        StoreUnavailable: git ran past :data:`GIT_TIMEOUT_S`.
    """
    path = repo_path(path)
    check_rev(rev)
    if "://" not in repo and Path(repo).exists():
        repo = str(Path(repo).resolve())  # NOTE: git runs in the scratch folder
    env = git_env()
    where = public_url(repo)
    scratch = Path(tempfile.mkdtemp(prefix="serving-git-"))
    try:
        work = scratch / "repo"
        work.mkdir()
        init_repository(work, env)
        commit = fetch_revision(repo, rev, work, where, env)
        target = _extract(work, commit, path, where, rev, env)
        lfs = _resolve_lfs(work, target, repo, commit, path, rev, env)
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
