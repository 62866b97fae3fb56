"""The store layout: versions, manifests and aliases, the same on every store.

``manifest.json`` is written last: a version without one does not exist, so
readers never see a half-written version. Moving an alias is one object write,
:meth:`Repository.move_alias`, with the change as a value::

    repo.move_alias("iris", "production", SetTarget("8"))
    repo.move_alias("iris", "production", SetCanary("9", weight=5))
    repo.move_alias("iris", "production", Promote())  # or Abort(), Rollback(), SetShadow(v, fraction)
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from serving.errors import (
    AliasChanged,
    AliasNotFound,
    IntegrityError,
    InvalidManifest,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    ServingError,
    StoreConflict,
    VersionExists,
    VersionNotFound,
)
from serving.fileio import hash_file
from serving.manifest import (
    MANIFEST_NAME,
    MAX_SEQUENCE,
    OMS_SIGNATURE_NAME,
    SIGNATURE_NAME,
    Alias,
    CanaryTarget,
    FileEntry,
    Manifest,
    ModelRef,
    ShadowTarget,
    check_name,
    check_relative_path,
    is_plain_name,
    now,
    sha256_bytes,
    version_sort_key,
)
from serving.store.base import MAX_GET_BYTES, ObjectStore, Progress

log = logging.getLogger(__name__)

AliasWriter = Callable[[Alias], bytes]
"""Turns the alias object to write into its bytes: ``Alias.to_json`` or a signer's."""

FEED_PREFIX = "_feed/"
"""Where the alias feed's markers live (``_feed/<alias>/<model>``); no model name starts with ``_``."""

CAS_ATTEMPTS = 50
"""Fresh read-modify-write attempts before an alias move gives up with StoreConflict."""


def whoami() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 -- NOTE: best effort; no user in some containers
        return "unknown"


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to one version, with the manifest's exact bytes."""

    name: str
    version: str
    manifest: Manifest
    manifest_raw: bytes
    alias: str | None = None
    alias_raw: bytes | None = None
    """The alias object's exact bytes, when resolved through the store (signed aliases), or
    as this node last accepted them, when resolved offline."""
    offline: bool = False
    """Resolved from the cache's memory because the store could not be asked."""

    @property
    def manifest_sha256(self) -> str:
        return sha256_bytes(self.manifest_raw)


ManifestLookup = Callable[[str, str, str], bytes | None]
"""``(name, version, manifest_sha256) -> manifest bytes`` when they are already held."""


@dataclass(frozen=True)
class AliasCheck:
    """Result of a cheap alias check: ``alias`` is None when nothing changed."""

    alias: Alias | None
    etag: str
    raw: bytes | None = None
    """The object's exact bytes, when it changed."""


def collect_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file below ``root`` (or ``root`` itself), refusing symlinks."""
    from serving.errors import InvalidManifest

    if root.is_symlink():
        raise InvalidManifest(f"refusing to publish symlink {root}")
    if root.is_file():
        return [(root.name, root)]
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise InvalidManifest(f"refusing to publish symlink {path}")
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            out.append((check_relative_path(rel), path))
    return out


class Repository:
    """Versions and aliases of models in one store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # -- keys ---------------------------------------------------------------
    @staticmethod
    def version_prefix(name: str, version: str) -> str:
        return f"{name}/versions/{version}/"

    @staticmethod
    def alias_key(name: str, alias: str) -> str:
        return f"{name}/aliases/{alias}.json"

    # -- reading ------------------------------------------------------------
    @staticmethod
    def feed_key(name: str, alias: str) -> str:
        return f"{FEED_PREFIX}{alias}/{name}"

    def list_models(self) -> list[str]:
        # NOTE: the alias feed's folder (and anything else not a plain name) is not a model.
        return [name for name in self.store.list_dirs("") if is_plain_name(name)]

    def alias_feed(self, alias: str) -> dict[str, str]:
        """Per model with ``alias``, its feed marker's ETag: one list request per 1,000 models.

        Every alias move also rewrites the model's marker under ``_feed/<alias>/``, so a
        replica that follows many models learns which aliases moved from one listing,
        and reads only those (:mod:`serving.runtime.feed`).
        """
        check_name(alias, "alias")
        prefix = f"{FEED_PREFIX}{alias}/"
        out = {}
        for obj in self.store.list(prefix):
            name = obj.key[len(prefix) :]
            if is_plain_name(name):
                out[name] = obj.etag
        return out

    def list_versions(self, name: str) -> list[str]:
        """Published versions (those with a manifest), oldest first."""
        check_name(name, "model name")
        candidates = self.store.list_dirs(f"{name}/versions/")
        # NOTE: a folder that is not a plain name (planted by a bucket writer: "2\n") cannot
        # be addressed, so it is not a version.
        found = [
            v
            for v in candidates
            if is_plain_name(v) and self.store.exists(f"{name}/versions/{v}/{MANIFEST_NAME}")
        ]
        return sorted(found, key=version_sort_key)

    def list_aliases(self, name: str) -> list[str]:
        objs = self.store.list(f"{name}/aliases/")
        return sorted(o.key.rsplit("/", 1)[-1].removesuffix(".json") for o in objs)

    def manifest(self, name: str, version: str) -> tuple[Manifest, bytes]:
        """The manifest of ``name:version`` and its exact bytes (what digests cover)."""
        check_name(name, "model name")
        check_name(version, "version")
        try:
            raw, _ = self.store.get(self.version_prefix(name, version) + MANIFEST_NAME)
        except NotFound as exc:
            raise self._missing_version(name, version) from exc
        manifest = Manifest.from_json(raw)
        if manifest.name != name or manifest.version != version:
            raise IntegrityError(f"manifest at {name}:{version} describes {manifest.name}:{manifest.version}")
        return manifest, raw

    def _missing_version(self, name: str, version: str) -> NotFound:
        if not self.store.list_dirs(f"{name}/") and not self.store.list(f"{name}/"):
            return ModelNotFound(f"model {name!r} not found in {self.store.uri}")
        return VersionNotFound(f"version {version!r} of model {name!r} not found")

    def version_files(self, name: str, version: str) -> dict[str, int]:
        """What is really stored under a version: relative path -> size."""
        prefix = self.version_prefix(name, version)
        return {o.key[len(prefix) :]: o.size for o in self.store.list(prefix)}

    def get_alias(self, name: str, alias: str) -> Alias:
        return self.read_alias(name, alias)[0]

    def read_alias(self, name: str, alias: str) -> tuple[Alias, bytes, str]:
        """The alias object, its exact bytes and its ETag (for a compare-and-swap)."""
        check_name(name, "model name")
        check_name(alias, "alias")
        try:
            raw, etag = self.store.get(self.alias_key(name, alias))
        except NotFound as exc:
            raise AliasNotFound(f"alias {name}@{alias} not found") from exc
        return _own(Alias.from_json(raw), name, alias), raw, etag

    def check_alias(self, name: str, alias: str, etag: str | None) -> AliasCheck:
        """One small request: a conditional GET that returns no body when unchanged."""
        try:
            raw, new_etag = self.store.get_if_changed(self.alias_key(name, alias), etag)
        except NotFound as exc:
            raise AliasNotFound(f"alias {name}@{alias} not found") from exc
        parsed = _own(Alias.from_json(raw), name, alias) if raw is not None else None
        return AliasCheck(parsed, new_etag, raw)

    def resolve(self, ref: ModelRef | str, known: ManifestLookup | None = None) -> Resolved:
        """Resolve ``name@alias`` or ``name:version`` to a version and its manifest.

        Args:
            ref: the reference.
            known: for aliases, ``(name, version, manifest_sha256) -> bytes | None``
                returning manifest bytes already held (the loader cache's), so an
                alias whose target is cached costs one request instead of two.
        """
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if ref.alias:
            target, alias_raw, _ = self.read_alias(ref.name, ref.alias)
            raw_known = known(ref.name, target.version, target.manifest_sha256) if known else None
            if raw_known is not None:
                manifest, raw = Manifest.from_json(raw_known), raw_known
            else:
                manifest, raw = self.manifest(ref.name, target.version)
            sha = sha256_bytes(raw)
            if sha != target.manifest_sha256:
                raise IntegrityError(
                    f"{ref}: manifest of version {target.version} changed after the alias "
                    f"was set (sha256 {sha[:12]} != {target.manifest_sha256[:12]})"
                )
            return Resolved(ref.name, target.version, manifest, raw, alias=ref.alias, alias_raw=alias_raw)
        assert ref.version is not None
        manifest, raw = self.manifest(ref.name, ref.version)
        return Resolved(ref.name, ref.version, manifest, raw)

    # -- writing ------------------------------------------------------------
    def next_version(self, name: str) -> str:
        ints = [int(v) for v in self.list_versions(name) if v.isdigit()]
        return str(max(ints, default=0) + 1)

    def publish(
        self,
        manifest: Manifest,
        files: Iterable[tuple[str, Path]],
        progress: Callable[[int], Progress | None] | None = None,
        signer: Callable[[bytes], bytes] | None = None,
        oms_signature: bytes | None = None,
    ) -> str:
        """Upload the files, then the manifest last; returns the manifest's sha256.

        ``signer`` maps the manifest's bytes to ``manifest.sig``'s (see
        :mod:`serving.signing`); the signature is written just before the manifest,
        so a version is never visible unsigned. ``oms_signature`` (an OpenSSF model
        signature over the files, :mod:`serving.oms`) is written before it too.

        Raises:
            VersionExists: the version is already published (versions are immutable).
        """
        name, version = check_name(manifest.name, "model name"), check_name(manifest.version, "version")
        prefix = self.version_prefix(name, version)
        if self.store.exists(prefix + MANIFEST_NAME):
            raise VersionExists(f"{name}:{version} already exists; versions are immutable")
        raw = manifest.to_json()
        if len(raw) > MAX_GET_BYTES:
            # NOTE: checked before any upload: no reader would ever accept this version.
            raise InvalidManifest(
                f"{name}:{version}: the manifest would be {len(raw)} bytes; readers accept at most "
                f"{MAX_GET_BYTES}"
            )
        for rel, path in files:
            self.store.upload(prefix + rel, path, progress(path.stat().st_size) if progress else None)
        if oms_signature is not None:
            self.store.put(prefix + OMS_SIGNATURE_NAME, oms_signature)
        if signer is not None:
            self.store.put(prefix + SIGNATURE_NAME, signer(raw))
        try:
            self.store.put(prefix + MANIFEST_NAME, raw, if_absent=True)
        except FileExistsError as exc:
            raise VersionExists(f"{name}:{version} was published concurrently") from exc
        return sha256_bytes(raw)

    def move_alias(
        self,
        name: str,
        alias: str,
        move: AliasMove,
        *,
        by: str | None = None,
        writer: AliasWriter | None = None,
        expires_at: str | None = None,
    ) -> Alias:
        """Apply ``move`` to ``name@alias`` (:class:`SetTarget`, :class:`Rollback`, ...); a compare-and-swap.

        The current object is read with its ETag and replaced only if nobody moved the
        alias meanwhile (S3 ``If-Match`` / ``If-None-Match: *``; a lock on a folder);
        a lost race applies the move again on a fresh read, so concurrent moves are
        never lost. Every new object has a higher ``sequence``, so a signed rollback is
        a legitimate move, not a replay.

        Args:
            by: who moves it (default ``user@host``).
            writer: the alias object's bytes (default ``Alias.to_json``); a signer signs it.
            expires_at: ISO 8601 expiry carried by the object (for signed aliases).

        Raises:
            VersionNotFound: a version the move names is not published.
            AliasNotFound: the move needs an existing alias (all but :class:`SetTarget`).
            InvalidRequest: the move does not apply to the alias as it is now.
        """
        check_name(alias, "alias")
        change = AliasChange(self, name, alias, by or whoami(), expires_at)
        move.check(change)

        def build(raw: bytes | None) -> Alias:
            current = None if raw is None else _own(Alias.from_json(raw), name, alias)
            return move.apply(current, change)

        return self._swap_alias(name, alias, writer, build)

    def _swap_alias(
        self, name: str, alias: str, writer: AliasWriter | None, build: Callable[[bytes | None], Alias]
    ) -> Alias:
        """Write ``build(the current bytes, None when absent)`` over them, a compare-and-swap: a lost
        race builds again on a fresh read, so concurrent moves are never lost."""
        check_name(name, "model name")
        key = self.alias_key(name, alias)
        encode = writer or (lambda a: a.to_json())
        for _ in range(CAS_ATTEMPTS):
            try:
                raw, etag = self.store.get(key)
            except NotFound:
                raw, etag = None, None
            new = build(raw)
            try:
                if etag is None:
                    self.store.put(key, encode(new), if_absent=True)
                else:
                    self.store.put(key, encode(new), if_match=etag)
            except (FileExistsError, StoreConflict):
                continue  # NOTE: someone else moved it first; redo the move on what they wrote
            self._mark_feed(name, alias, new)
            return new
        raise StoreConflict(
            f"{name}@{alias}: gave up after {CAS_ATTEMPTS} attempts, other writers kept moving it"
        )

    def _mark_feed(self, name: str, alias: str, new: Alias) -> None:
        """Rewrite the alias feed's marker of ``name@alias`` (best effort: the move has happened).

        A replica that misses a marker still sees the move at its next full check."""
        marker = json.dumps({"version": new.version, "sequence": new.sequence, "at": now()}).encode()
        try:
            self.store.put(self.feed_key(name, alias), marker)
        except ServingError as exc:
            log.warning("%s@%s moved, but its alias feed marker was not written: %s", name, alias, exc)

    def repair_alias(
        self,
        name: str,
        alias: str,
        version: str,
        *,
        by: str | None = None,
        writer: AliasWriter | None = None,
        expires_at: str | None = None,
        sequence: int | None = None,
    ) -> tuple[Alias, str | None]:
        """Point ``name@alias`` at ``version`` whatever the object there holds, even unreadable bytes.

        ``serving alias set`` refuses to move an alias object it cannot read; this
        replaces it with a valid one. The old bytes are kept at the returned key
        (``<name>/repairs/<alias>-<sequence>.json``; None when there was no object).
        The new sequence is the old one plus one when it can be read, otherwise one
        more than the largest of any sequence the bytes still show and ``sequence``
        (by default the current Unix time): above any sequence a replica accepted
        before, so replicas that refuse replays accept the repair. One that would
        pass ``MAX_SEQUENCE`` is refused (InvalidRequest).
        A compare-and-swap, like every move.

        Raises:
            VersionNotFound: ``version`` is not published.
            StoreConflict: other writers kept moving the alias.
        """
        check_name(alias, "alias")
        if sequence is not None and not 0 <= sequence <= MAX_SEQUENCE:
            raise InvalidRequest(f"--sequence must be between 0 and {MAX_SEQUENCE}")
        _, raw_manifest = self.manifest(name, version)
        sha = sha256_bytes(raw_manifest)
        kept: list[str | None] = [None]

        def build(old_raw: bytes | None) -> Alias:
            old = _readable_alias(old_raw, name, alias)
            # NOTE: never below a sequence the old bytes carry, readable or not: a replica that
            # accepted it would refuse anything lower as a replay.
            if old is not None:
                seq = old.seq + 1
            else:
                seq = (
                    max(_lenient_sequence(old_raw), sequence if sequence is not None else int(time.time()))
                    + 1
                )
            if seq > MAX_SEQUENCE:
                raise InvalidRequest(
                    f"{name}@{alias}: its sequence would pass {MAX_SEQUENCE}, the largest a reader accepts; "
                    "replicas that remember it cannot accept another move"
                )
            if old is not None:
                new = old.moved_to(version, sha, by or whoami(), expires_at).model_copy(
                    update={"canary": None, "shadow": None}
                )
            else:
                new = Alias(
                    name=name,
                    alias=alias,
                    version=version,
                    manifest_sha256=sha,
                    updated_by=by or whoami(),
                    sequence=seq,
                    expires_at=expires_at,
                )
            path = None
            if old_raw is not None:
                path = f"{name}/repairs/{alias}-{new.seq}.json"
                self.store.put(path, old_raw)
            kept[0] = path
            return new

        return self._swap_alias(name, alias, writer, build), kept[0]


def _own(parsed: Alias, name: str, alias: str) -> Alias:
    """``parsed``, if it is this alias's object: one copied from another model or alias is refused."""
    if (parsed.name, parsed.alias) != (name, alias):
        raise InvalidManifest(
            f"the object at {name}@{alias} describes {parsed.name}@{parsed.alias}; "
            f"'serving alias repair {name} {alias} --to VERSION' replaces it"
        )
    return parsed


def _lenient_sequence(raw: bytes | None) -> int:
    """The ``sequence`` in ``raw`` if any reader could see one there (0 otherwise)."""
    try:
        doc = json.loads(raw or b"")
    except (ValueError, RecursionError):
        return 0
    seq = doc.get("sequence") if isinstance(doc, dict) else None
    # NOTE: one past MAX_SEQUENCE no reader accepted, so no replica remembers it.
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq <= MAX_SEQUENCE else 0


def _readable_alias(raw: bytes | None, name: str, alias: str) -> Alias | None:
    """The alias object in ``raw`` if it is valid and names this alias, else None."""
    if raw is None:
        return None
    try:
        parsed = Alias.from_json(raw)
    except (InvalidManifest, ValueError):
        return None
    if (parsed.name, parsed.alias) != (name, alias):
        return None
    return parsed


@dataclass
class AliasChange:
    """What a move sees besides the current object: which alias, who moves it, until when."""

    repo: Repository
    name: str
    alias: str
    by: str
    expires_at: str | None
    _sha256: dict[str, str] = field(default_factory=dict, repr=False)

    def manifest_sha256(self, version: str) -> str:
        """The sha256 of ``version``'s manifest, read once (VersionNotFound if it is not published)."""
        if version not in self._sha256:
            _, raw = self.repo.manifest(self.name, version)
            self._sha256[version] = sha256_bytes(raw)
        return self._sha256[version]

    def existing(self, current: Alias | None, hint: str = "") -> Alias:
        """``current``, or AliasNotFound when the alias does not exist."""
        if current is None:
            raise AliasNotFound(f"alias {self.name}@{self.alias} not found{hint}")
        return current


class AliasMove(ABC):
    """One change of an alias object, for :meth:`Repository.move_alias`."""

    def check(self, change: AliasChange) -> None:  # noqa: B027 -- NOTE: most moves check nothing up front
        """Checks made once, before the alias is read (default: none)."""

    @abstractmethod
    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        """The new alias object, from the current one (None: the alias does not exist yet).

        Called again on a fresh ``current`` when another writer moved the alias first.
        """


@dataclass(frozen=True)
class _ToVersion(AliasMove):
    version: str

    def check(self, change: AliasChange) -> None:
        change.manifest_sha256(self.version)  # NOTE: it must exist, before the alias is touched

    def beside(self, current: Alias | None, change: AliasChange) -> Alias:
        """The alias that gets ``version`` as its canary or shadow (never as both target and split)."""
        live = change.existing(current, ": set it first, then add a canary")
        if live.version == self.version:
            raise InvalidRequest(
                f"{change.name}@{change.alias} already points at {self.version}; "
                "a canary or shadow is another version"
            )
        return live


@dataclass(frozen=True)
class SetTarget(_ToVersion):
    """Point the alias at ``version`` (creating the alias); the old target goes to history."""

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        sha = change.manifest_sha256(self.version)
        if current is None:
            return Alias(
                name=change.name,
                alias=change.alias,
                version=self.version,
                manifest_sha256=sha,
                updated_by=change.by,
                sequence=1,
                expires_at=change.expires_at,
            )
        return current.moved_to(self.version, sha, change.by, change.expires_at)


@dataclass(frozen=True)
class Rollback(AliasMove):
    """Move the alias back to its previous target, dropping that history entry."""

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        current = change.existing(current)
        if not current.history:
            raise AliasNotFound(f"{change.name}@{change.alias} has no previous target to roll back to")
        change.manifest_sha256(current.history[-1].version)  # NOTE: it must still exist
        return current.rolled_back(change.by, change.expires_at)


def _holder(current: Alias) -> str:
    return f"set by {current.updated_by} at {current.updated_at}"


def _split_conflict(
    change: AliasChange, role: str, held: str | None, wanted: str | None, current: Alias
) -> None:
    """Refuse (AliasChanged) when the alias's ``role`` holds ``held`` and the move expected ``wanted``."""
    if held != wanted:
        raise AliasChanged(
            f"{change.name}@{change.alias}: its {role} is {held or 'unset'} ({_holder(current)}), "
            f"not {wanted or 'unset'} as this move expected; another writer changed it, nothing was written"
        )


@dataclass(frozen=True)
class SetCanary(_ToVersion):
    """Keep the target; send ``weight`` percent of the requests to ``version`` (a shadow stays).

    A canary of another version is never replaced silently: that is another writer's
    rollout. ``replace=True`` (``serving alias set --canary ... --replace``) does it on purpose.
    """

    weight: float
    replace: bool = False
    live: str | None = None
    """The target the caller expects (a rollout's): another one is refused (AliasChanged)."""

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        live = self.beside(current, change)
        if self.live is not None:
            _split_conflict(change, "target", live.version, self.live, live)
        if live.canary is not None and not self.replace and live.canary.version != self.version:
            _split_conflict(change, "canary", live.canary.version, self.version, live)
        canary = CanaryTarget(
            version=self.version, manifest_sha256=change.manifest_sha256(self.version), weight=self.weight
        )
        return live.with_split(change.by, canary=canary, shadow=live.shadow, expires_at=change.expires_at)


@dataclass(frozen=True)
class SetShadow(_ToVersion):
    """Keep the target; mirror ``fraction`` of the requests to ``version`` (a canary stays).

    As for a canary, a shadow of another version is replaced only with ``replace=True``.
    """

    fraction: float
    replace: bool = False
    live: str | None = None
    """The target the caller expects (a rollout's): another one is refused (AliasChanged)."""

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        live = self.beside(current, change)
        if self.live is not None:
            _split_conflict(change, "target", live.version, self.live, live)
        if live.shadow is not None and not self.replace and live.shadow.version != self.version:
            _split_conflict(change, "shadow", live.shadow.version, self.version, live)
        shadow = ShadowTarget(
            version=self.version, manifest_sha256=change.manifest_sha256(self.version), fraction=self.fraction
        )
        return live.with_split(change.by, canary=live.canary, shadow=shadow, expires_at=change.expires_at)


@dataclass(frozen=True)
class Promote(AliasMove):
    """Make the canary the alias's target (the old target goes to history).

    ``expected``: the canary version the caller judged; ``live``: the target it was judged
    against. Another one is refused (AliasChanged), so nobody promotes a version they did
    not judge, or over a target someone else has moved since.
    """

    expected: str | None = None
    live: str | None = None

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        current = change.existing(current)
        if self.live is not None:
            _split_conflict(change, "target", current.version, self.live, current)
        if current.canary is None:
            if self.expected is not None:
                _split_conflict(change, "canary", None, self.expected, current)
            raise InvalidRequest(f"{change.name}@{change.alias} has no canary to promote")
        if self.expected is not None:
            _split_conflict(change, "canary", current.canary.version, self.expected, current)
        return current.promoted(change.by, change.expires_at)


@dataclass(frozen=True)
class Abort(AliasMove):
    """Drop the canary and the shadow: every request goes to the target again.

    ``expected``: the version the caller put there as canary or shadow; when the alias
    holds another, it is another writer's and is refused (AliasChanged), not dropped.
    """

    expected: str | None = None

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        current = change.existing(current)
        if current.canary is None and current.shadow is None:
            raise InvalidRequest(f"{change.name}@{change.alias} has no canary or shadow to abort")
        if self.expected is not None:
            for role, split in (("canary", current.canary), ("shadow", current.shadow)):
                if split is not None:
                    _split_conflict(change, role, split.version, self.expected, current)
        return current.with_split(change.by, canary=None, shadow=None, expires_at=change.expires_at)


@dataclass(frozen=True)
class Withdraw(AliasMove):
    """Take ``version`` out of the alias's canary and shadow, leaving any other version's there.

    A rollout's cleanup: whatever else changed, its own unjudged version stops taking traffic,
    and another writer's canary or shadow stays theirs. Refused (InvalidRequest) when
    ``version`` is in neither role, so nothing is written.
    """

    version: str

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        current = change.existing(current)
        canary = (
            None if current.canary is not None and current.canary.version == self.version else current.canary
        )
        shadow = (
            None if current.shadow is not None and current.shadow.version == self.version else current.shadow
        )
        if (canary, shadow) == (current.canary, current.shadow):
            raise InvalidRequest(f"{change.name}@{change.alias} has no canary or shadow {self.version}")
        return current.with_split(change.by, canary=canary, shadow=shadow, expires_at=change.expires_at)


@dataclass(frozen=True)
class Noted(AliasMove):
    """``move``, with an event recorded in the object it writes: a rollout's step, its
    promotion or its abort, with what was judged (:class:`serving.manifest.AliasEvent`)."""

    move: AliasMove
    event: str
    version: str
    detail: str = ""

    def check(self, change: AliasChange) -> None:
        self.move.check(change)

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        return self.move.apply(current, change).noted(self.event, self.version, self.detail, change.by)


@dataclass(frozen=True)
class Expecting(AliasMove):
    """``move``, only if the alias is still the object of ``sequence`` (what the caller last
    wrote or read): any other writer's change in between, of any kind, is refused
    (AliasChanged), naming what the alias holds now and who wrote it."""

    move: AliasMove
    sequence: int

    def check(self, change: AliasChange) -> None:
        self.move.check(change)

    def apply(self, current: Alias | None, change: AliasChange) -> Alias:
        current = change.existing(current)
        if current.seq != self.sequence:
            split = "".join(
                f", {role} {s.version}"
                for role, s in (("canary", current.canary), ("shadow", current.shadow))
                if s is not None
            )
            now = f"-> {current.version}{split} (sequence {current.seq}, {_holder(current)})"
            raise AliasChanged(
                f"{change.name}@{change.alias} changed under this move: it is now {now}, "
                f"not sequence {self.sequence}; nothing was written"
            )
        return self.move.apply(current, change)


def file_entries(files: Iterable[tuple[str, Path]]) -> list[FileEntry]:
    out = []
    for rel, path in files:
        size, digest = hash_file(path)
        out.append(FileEntry(path=rel, size=size, sha256=digest))
    return out
