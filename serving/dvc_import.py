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
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from serving.errors import InvalidRequest, StoreUnavailable
from serving.git_import import check_rev, public_url, repo_path
from serving.manifest import Manifest
from serving.publish import publish_path
from serving.repository import Repository

__all__ = ["DvcSource", "checkout", "import_dvc"]

log = logging.getLogger(__name__)


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
    """The DVC remote asked for, or None for the repository's default."""

    def as_metadata(self) -> dict[str, Any]:
        return {"type": "dvc", **asdict(self)}


def _dvc() -> Any:
    try:
        import dvc.api
    except ImportError as exc:
        raise InvalidRequest("serving import dvc needs DVC: pip install 'serving[dvc]'") from exc
    return dvc.api


@contextmanager
def _reasons(where: str, path: str, rev: str) -> Iterator[None]:
    """DVC's and Git's failures as InvalidRequest or StoreUnavailable, with one line that says why."""
    from dvc.exceptions import DvcException

    at = f" at {rev}"
    try:
        yield
    except (InvalidRequest, StoreUnavailable):
        raise
    except FileNotFoundError:
        raise InvalidRequest(f"{where} has no {path!r}{at}") from None
    except DvcException as exc:
        name = type(exc).__name__
        line = (str(exc).strip().splitlines() or [name])[0]
        if name in ("RevError", "UnknownRevision"):
            raise InvalidRequest(f"{where} has no revision {rev!r}: {line}") from None
        if name in ("PathMissingError", "OutputNotFoundError"):
            raise InvalidRequest(f"{where} has no {path!r}{at}") from None
        raise InvalidRequest(f"{where}: {public_url(line)}") from None
    except OSError as exc:
        # NOTE: the remote or the Git server could not be reached (or refused the connection).
        raise StoreUnavailable(f"cannot read {path!r} from {where}: {public_url(str(exc))}") from None


def _hash_of(fs: Any, name: str) -> Any:
    """The HashInfo Git (or a verified listing) records for ``name``, or None when DVC does not track it."""
    entry = (fs.info(name).get("dvc_info") or {}).get("entry")
    return None if entry is None else entry.hash_info


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


def _listing(fs: Any, output: str, recorded: Any) -> dict[str, Any]:
    """The files of a tracked folder and their hashes, once the listing matches its recorded digest."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    files = {name: info["dvc_info"]["entry"].hash_info for name, info in fs.find(output, detail=True).items()}
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
        raise InvalidRequest(
            f"the DVC remote's listing of {output!r} has digest {got}, but Git records {recorded.value}: "
            "refusing a corrupt remote"
        )
    return files


def _fetch_checked(fs: Any, name: str, expected: Any, target: Path) -> None:
    """Download ``name`` to ``target`` and check it against ``expected`` before anything reads it."""
    from dvc_data.hashfile.hash import file_md5

    target.parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(name, str(target))
    got = file_md5(str(target), name=expected.name)
    if got != expected.value:
        raise InvalidRequest(
            f"the DVC remote sent {name!r} with {expected.name} {got}, but the repository records "
            f"{expected.value}: refusing a corrupt remote"
        )


@contextmanager
def checkout(
    repo: str, path: str, rev: str, *, remote: str | None = None
) -> Iterator[tuple[Path, DvcSource]]:
    """``path`` of the DVC repository ``repo`` at ``rev``, checked, in a scratch folder removed on exit.

    Raises:
        InvalidRequest: not a Git or DVC repository, no such revision or path, a path DVC does
            not track, no remote, or bytes (or a folder listing) that do not match what Git records.
        StoreUnavailable: the Git server or the DVC remote could not be reached.
    """
    path = repo_path(path)
    check_rev(rev)
    if "://" not in repo and Path(repo).exists():
        repo = str(Path(repo).resolve())
    where = public_url(repo)
    api = _dvc()
    scratch = Path(tempfile.mkdtemp(prefix="serving-dvc-"))
    fs = None
    try:
        with _reasons(where, path, rev):
            fs = api.DVCFileSystem(repo, rev=rev, remote=remote)
            commit = str(fs.repo.get_rev())  # NOTE: the tree DVC reads, not the checkout's HEAD
            output, recorded = _output(fs, path)
            out = scratch / "out"
            target = out.joinpath(*PurePosixPath(path).parts)
            if output == path and not recorded.isdir:
                _fetch_checked(fs, path, recorded, target)
            else:
                files = _listing(fs, output, recorded)
                mine = {n: h for n, h in files.items() if n == path or n.startswith(path + "/")}
                if not mine:
                    raise InvalidRequest(f"{where} has no {path!r} at {rev}")
                for name, hash_info in sorted(mine.items()):
                    if ".." in PurePosixPath(name).parts:
                        raise InvalidRequest(f"the DVC listing of {output!r} names {name!r}, outside it")
                    _fetch_checked(fs, name, hash_info, out.joinpath(*PurePosixPath(name).parts))
        source = DvcSource(where, rev, commit, path, output, recorded.value, recorded.name, remote)
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
