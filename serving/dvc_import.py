"""``serving import dvc``: publish a DVC-tracked file or folder, read from the repository's DVC remote.

Teams that keep models with DVC commit a small ``.dvc`` file (the model's md5) to Git and push
the bytes to a DVC remote: a folder, S3, or any other remote DVC supports. :func:`import_dvc`
reads ``path`` at ``rev`` through DVC's own API (:class:`dvc.api.DVCFileSystem`: DVC resolves
the revision, reads the ``.dvc`` file and fetches from the remote), then checks every byte
against the md5 that Git recorded before publishing. DVC does not check what a remote sends,
so a corrupt or tampered remote is refused here, and never reaches a deserializer::

    metadata.source = {"type": "dvc", "repo": "https://git.example.com/ml/models.git",
                       "rev": "v1.2", "commit": "<40 hex>", "path": "models/iris.joblib",
                       "output": "models/iris.joblib", "md5": "<32 hex>", "hash": "md5",
                       "remote": null}

For a tracked folder (or a path inside one), ``output`` is that folder and ``md5`` its
``.dir`` digest: the folder's listing that the remote sends is checked against it, and each
file against the listing.

Credentials in the URL are used for the clone and never recorded (:func:`public_url`). The
remote's own credentials come from DVC's configuration and the environment, as ``dvc pull``
would take them (``AWS_*`` for S3).

Example::

    manifest, source = import_dvc(repo, "https://git.example.com/ml/models.git",
                                  "models/iris.joblib", rev="v1.2", name="iris")
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from serving.errors import IntegrityError, InvalidRequest, StoreUnavailable
from serving.git_import import (
    check_rev,
    fetch_revision,
    git_env,
    init_repository,
    public_url,
    redact,
    repo_path,
)
from serving.manifest import Manifest
from serving.publish import publish_path
from serving.repository import Repository

__all__ = ["DvcSource", "checkout", "import_dvc"]

log = logging.getLogger(__name__)

MAX_IMPORT_BYTES = 64 * 1024**3
"""What one import may download when Git records no size (outputs of old DVC versions)."""


@dataclass(frozen=True)
class DvcSource:
    """Where a version came from, as its manifest records it (``metadata.source``)."""

    repo: str
    """The Git repository, with any credentials removed."""
    rev: str
    """What was asked for: a tag, a branch or a commit (never the working tree, which Git does not record)."""
    commit: str
    """The commit the ``.dvc`` file was read at (40 hex digits)."""
    path: str
    """The file or folder in the repository."""
    output: str
    """The DVC output ``path`` belongs to: ``path`` itself, or the tracked folder it is in."""
    md5: str
    """The digest Git records for ``output``: a file's md5, or a folder's ``<md5>.dir``."""
    hash: str
    """DVC's hash name: ``md5``, or ``md5-dos2unix`` for outputs written by DVC 2."""
    remote: str | None = None
    """The DVC remote the bytes came from: ``--remote``, the output's own, or the repository's default."""

    def as_metadata(self) -> dict[str, Any]:
        return {"type": "dvc", **asdict(self)}


def _dvc() -> Any:
    try:
        import dvc.api
    except ImportError as exc:
        raise InvalidRequest("serving import dvc needs DVC: pip install 'serving[dvc]'") from exc
    return dvc.api


def _line(exc: BaseException) -> str:
    """The first line of an exception's message, credentials removed."""
    return redact((str(exc).strip().splitlines() or [type(exc).__name__])[0])[:300]


@contextmanager
def _reasons(where: str, path: str, rev: str) -> Iterator[None]:
    """Every failure of Git or DVC as one line: InvalidRequest, StoreUnavailable or IntegrityError.

    NOTE: DVC raises whatever its parsers and transports raise (RecursionError on a deep listing,
    KeyError on an odd index, EOFError from a password prompt): none of them may end as a
    traceback, and none of their messages may carry a URL's password.
    """
    from dvc.exceptions import DvcException

    at = f" at {rev}"
    try:
        yield
    except (InvalidRequest, StoreUnavailable, IntegrityError):
        raise
    except FileNotFoundError:
        raise InvalidRequest(f"{where} has no {path!r}{at}") from None
    except DvcException as exc:
        name = type(exc).__name__
        if name in ("RevError", "UnknownRevision"):
            raise InvalidRequest(f"{where} has no revision {rev!r}: {_line(exc)}") from None
        if name in ("PathMissingError", "OutputNotFoundError"):
            raise InvalidRequest(f"{where} has no {path!r}{at}") from None
        raise InvalidRequest(f"{where}: {_line(exc)}") from None
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {path!r} from {where}: {_line(exc)}") from None
    except EOFError:
        raise InvalidRequest(
            f"{where}: DVC asked for a password; give it in the DVC config or the environment"
        ) from None
    except Exception as exc:  # NOTE: see above; logged with its traceback for a bug report
        log.debug("DVC failed on %s", where, exc_info=True)
        raise InvalidRequest(
            f"{where}: DVC could not read {path!r}{at} ({type(exc).__name__}: {_line(exc)})"
        ) from None


@contextmanager
def _from_remote(name: str) -> Iterator[None]:
    """Failures while the remote sends ``name``: it is tracked (Git says so), so the remote is at fault."""
    try:
        yield
    except (InvalidRequest, StoreUnavailable, IntegrityError):
        raise
    except Exception as exc:  # noqa: BLE001 -- NOTE: DVC's transports raise anything
        raise StoreUnavailable(
            f"the DVC remote cannot send {name!r}: {type(exc).__name__}: {_line(exc)}"
        ) from None


@contextmanager
def _no_stdin() -> Iterator[None]:
    """DVC asks for passwords on stdin (``ask_password`` in a repository's config): never wait for one."""
    saved = sys.stdin
    with open(os.devnull) as devnull:
        sys.stdin = devnull
        try:
            yield
        finally:
            sys.stdin = saved


def _hash_of(fs: Any, name: str) -> Any:
    """The HashInfo Git (or a verified listing) records for ``name``, or None when DVC does not track it."""
    entry = (fs.info(name).get("dvc_info") or {}).get("entry")
    return None if entry is None else entry.hash_info


def _size_of(fs: Any, name: str) -> int | None:
    entry = (fs.info(name).get("dvc_info") or {}).get("entry")
    size = None if entry is None or entry.meta is None else entry.meta.size
    return int(size) if isinstance(size, int) and size >= 0 else None


def _output(fs: Any, path: str) -> tuple[str, Any]:
    """The DVC output holding ``path`` (itself, or the tracked folder it is in) and its recorded hash."""
    # NOTE: outermost first. The digest of a file inside a tracked folder comes from the folder's
    # listing, which the remote sends: only the folder's own digest is Git's.
    ancestors = [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "."]
    for candidate in [*ancestors, path]:
        info = _hash_of(fs, candidate)
        if info is not None and info.value and (candidate == path or info.isdir):
            return candidate, info
    raise InvalidRequest(f"{path!r} is not tracked by DVC: import it with `serving import git`")


def _declared(fs: Any, output: str, remote: str | None) -> str | None:
    """Refuse what the output's stage says that this import would not honour; the remote it reads from.

    Two ``.dvc`` files that claim one path (DVC picks one silently), an output that is a DVC
    import of another repository (DVC would clone that one, from a URL the repository names),
    and an output path outside the repository are refused.
    """
    claims = [o for o in fs.repo.index.outs if str(o.fs_path).lstrip("/") == output]
    if len(claims) > 1:
        files = ", ".join(sorted(str(o.stage.relpath) for o in claims))
        raise InvalidRequest(
            f"{output!r} is claimed by more than one DVC file ({files}): refusing to pick one"
        )
    if not claims:
        return remote
    out = claims[0]
    if ".." in PurePosixPath(str(out.def_path)).parts:
        raise InvalidRequest(f"{output!r} is declared outside its DVC file's folder ({out.def_path!r})")
    if out.stage.is_import or out.stage.is_repo_import:
        raise InvalidRequest(
            f"{output!r} is a DVC import of another source: import from that repository instead"
        )
    own = getattr(out, "remote", None)
    if own and remote and own != remote:
        raise InvalidRequest(f"{output!r} names its own DVC remote {own!r}, not --remote {remote!r}")
    return own or remote or fs.repo.config.get("core", {}).get("remote")


def _listing(fs: Any, output: str, recorded: Any) -> dict[str, Any]:
    """The files of a tracked folder and their hashes, once the listing matches its recorded digest."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    files = {}
    for name, info in fs.find(output, detail=True).items():
        entry = (info.get("dvc_info") or {}).get("entry")
        if entry is None:
            raise InvalidRequest(
                f"{name!r} is committed to Git inside the DVC-tracked {output!r}: a mixed folder"
            )
        files[name] = entry.hash_info
    tree = Tree()  # type: ignore[no-untyped-call]
    for name, hash_info in files.items():
        if hash_info is None or not hash_info.value:
            raise InvalidRequest(f"the DVC remote's listing of {output!r} has no digest for {name!r}")
        tree.add(
            tuple(PurePosixPath(name).relative_to(output).parts),
            None,
            HashInfo(recorded.name, hash_info.value),
        )
    tree.digest(name=recorded.name)
    if tree.hash_info is None or tree.hash_info.value != recorded.value:
        got = tree.hash_info.value if tree.hash_info else None
        raise IntegrityError(
            f"the DVC remote's listing of {output!r} has digest {got}, but Git records {recorded.value}: "
            "refusing a corrupt remote"
        )
    return files


def _fetch_checked(
    fs: Any, name: str, expected: Any, size: int | None, target: Path, budget: list[int]
) -> None:
    """Copy ``name`` from the remote to ``target``, at most ``size`` bytes (and what is left of
    ``budget[0]``), then check it against ``expected`` before anything reads it."""
    from dvc_data.hashfile.hash import file_md5

    target.parent.mkdir(parents=True, exist_ok=True)
    limit = budget[0] if size is None else min(size, budget[0])
    written = 0
    with _from_remote(name), fs.open(name, "rb") as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise IntegrityError(
                    f"the DVC remote sent more than the {limit} bytes recorded for {name!r}: "
                    "refusing a corrupt remote"
                )
            out.write(chunk)
    budget[0] -= written
    if size is not None and written != size:
        raise IntegrityError(
            f"the DVC remote sent {written} bytes for {name!r}, the repository records {size}: "
            "refusing a corrupt remote"
        )
    got = file_md5(str(target), name=expected.name)
    if got != expected.value:
        raise IntegrityError(
            f"the DVC remote sent {name!r} with {expected.name} {got}, but the repository records "
            f"{expected.value}: refusing a corrupt remote"
        )


def _open_repo(
    api: Any, repo: str, rev: str, where: str, scratch: Path, remote: str | None
) -> tuple[Any, str]:
    """A DVCFileSystem at ``rev``, and the commit it reads.

    A URL is fetched by git into ``scratch`` (no prompt, nothing kept after), so DVC never clones
    on its own: its clones outlive the import, with the URL's credentials in their config. DVC's
    site cache (its index of listings) and object cache are in ``scratch`` too, so nothing a
    remote sent survives the import, and nothing another run left is trusted.
    """
    config = {"core": {"site_cache_dir": str(scratch / "site")}, "cache": {"dir": str(scratch / "cache")}}
    source = repo
    if "://" in repo or not Path(repo).exists():
        work = scratch / "repo"
        work.mkdir()
        env = git_env()
        init_repository(work, env)
        commit = fetch_revision(repo, rev, work, where, env)
        source, rev = str(work), commit
    fs = api.DVCFileSystem(source, rev=rev, remote=remote, config=config)
    return fs, str(fs.repo.get_rev())


@contextmanager
def checkout(
    repo: str, path: str, rev: str, *, remote: str | None = None
) -> Iterator[tuple[Path, DvcSource]]:
    """``path`` of the DVC repository ``repo`` at ``rev``, checked, in a scratch folder removed on exit.

    Raises:
        InvalidRequest: not a Git or DVC repository, no such revision or path, a path DVC does
            not track, an output this import does not honour (see :func:`_declared`).
        IntegrityError: bytes (or a folder listing) that do not match what Git records.
        StoreUnavailable: the Git server or the DVC remote could not be reached or lacks an object.
    """
    path = repo_path(path)
    check_rev(rev)
    if remote is not None and not remote.strip():
        raise InvalidRequest("--remote needs a remote's name")
    if "://" not in repo and Path(repo).exists():
        repo = str(Path(repo).resolve())
    where = public_url(repo)
    api = _dvc()
    scratch = Path(tempfile.mkdtemp(prefix="serving-dvc-"))
    fs = None
    try:
        with _no_stdin(), _reasons(where, path, rev):
            fs, commit = _open_repo(api, repo, rev, where, scratch, remote)
            output, recorded = _output(fs, path)
            used = _declared(fs, output, remote)
            out = scratch / "out"
            target = out.joinpath(*PurePosixPath(path).parts)
            total = _size_of(fs, output)
            budget = [total if total is not None else MAX_IMPORT_BYTES]
            if output == path and not recorded.isdir:
                _fetch_checked(fs, path, recorded, total, target, budget)
            else:
                with _from_remote(output):
                    files = _listing(fs, output, recorded)
                mine = {n: h for n, h in files.items() if n == path or n.startswith(path + "/")}
                if not mine:
                    raise InvalidRequest(f"{where} has no {path!r} at {rev}")
                for name, hash_info in sorted(mine.items()):
                    parts = PurePosixPath(name).parts
                    if ".." in parts or "." in parts or "" in parts:
                        raise InvalidRequest(f"the DVC listing of {output!r} names {name!r}, outside it")
                    size = _size_of(fs, name)
                    _fetch_checked(fs, name, hash_info, size, out.joinpath(*parts), budget)
                if path == output and total is not None and budget[0] != 0:
                    # NOTE: per-file sizes may be absent (DVC 2): the folder's recorded total still binds
                    raise IntegrityError(
                        f"the DVC remote sent {total - budget[0]} bytes for {output!r}, the repository "
                        f"records {total}: refusing a corrupt remote"
                    )
        source = DvcSource(where, rev, commit, path, output, recorded.value, recorded.name, used)
        yield target, source
    finally:
        if fs is not None:
            with contextlib.suppress(Exception):
                fs.close()
        shutil.rmtree(scratch, ignore_errors=True)


def import_dvc(
    repo: Repository,
    url: str,
    path: str,
    *,
    name: str,
    rev: str,
    remote: str | None = None,
    **publish: Any,
) -> tuple[Manifest, DvcSource]:
    """Publish the DVC-tracked ``path`` of ``url`` at ``rev`` as a new version of ``name``.

    ``publish`` takes :func:`serving.publish.publish_path`'s keywords (``version``,
    ``format``, ``alias``, ``example``, ``signing_key``, ...); ``metadata`` is kept and
    ``source`` is set to the DVC source.
    """
    with checkout(url, path, rev, remote=remote) as (target, source):
        metadata = {**(publish.pop("metadata", None) or {}), "source": source.as_metadata()}
        manifest = publish_path(repo, target, name, metadata=metadata, **publish)
    log.info("imported %s@%s:%s (dvc) as %s:%s", source.repo, rev, path, manifest.name, manifest.version)
    return manifest, source
