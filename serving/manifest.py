"""Pure data: manifests, aliases and model references.

The store layout is a public contract, so other tools can publish::

    <root>/<model>/versions/<version>/manifest.json
    <root>/<model>/versions/<version>/<artifact files>
    <root>/<model>/aliases/<alias>.json
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from serving.errors import InvalidManifest, InvalidReference

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
OMS_SIGNATURE_NAME = "oms.sig"
"""An OpenSSF model signature beside the manifest (serving.oms)."""
"""Signatures over manifest.json (serving.signing), next to it in the version prefix."""
SCHEMA_VERSION = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def is_plain_name(value: str) -> bool:
    """Whether ``value`` passes :func:`check_name`."""
    return bool(_NAME_RE.fullmatch(value)) and value not in {".", ".."}


def check_name(value: str, what: str = "name") -> str:
    """Model names, versions and aliases become path segments: keep them plain."""
    if not _NAME_RE.fullmatch(value) or value in {".", ".."}:
        raise InvalidReference(f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return value


MAX_PATH_BYTES = 1024
"""Longest artifact path (UTF-8 bytes); with the cache's prefix it stays under PATH_MAX."""
MAX_SEGMENT_BYTES = 200
"""Longest path segment: filesystems stop at 255, and the cache adds a suffix to some names."""


def check_relative_path(path: str) -> str:
    """Refuse absolute paths, ``..``, over-long names and anything that is not a plain relative path."""
    if not path or "\\" in path or "\x00" in path:
        raise InvalidManifest(f"unsafe path in manifest: {path!r}")
    if len(path.encode()) > MAX_PATH_BYTES or any(
        len(part.encode()) > MAX_SEGMENT_BYTES for part in path.split("/")
    ):
        raise InvalidManifest(
            f"path in manifest too long: {path[:60]!r}... (at most {MAX_PATH_BYTES} bytes, "
            f"{MAX_SEGMENT_BYTES} per segment)"
        )
    p = PurePosixPath(path)
    if p.is_absolute() or any(part in {"..", "."} for part in p.parts) or str(p) != path:
        raise InvalidManifest(f"unsafe path in manifest: {path!r}")
    if path in {MANIFEST_NAME, SIGNATURE_NAME, OMS_SIGNATURE_NAME}:
        raise InvalidManifest(f"{path} cannot be listed as an artifact file")
    return path


ENCODINGS = ("zstd", "gzip", "aesgcm")
"""Stored encodings, applied in the listed order on publish (compress, then encrypt)."""


class FileEntry(BaseModel):
    """One artifact file: path relative to the version, size and sha256.

    ``size`` and ``sha256`` describe the plaintext the loader reads. A file
    stored compressed and/or encrypted also records ``encoding`` (the steps
    applied on publish, in order) and the stored object's ``stored_size`` and
    ``stored_sha256``, checked before any decoding; the plaintext is checked
    against ``size``/``sha256`` after. Plain files omit the three fields.
    """

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    encoding: list[str] | None = Field(default=None, exclude_if=lambda v: v is None)
    stored_size: int | None = Field(default=None, ge=0, exclude_if=lambda v: v is None)
    stored_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$", exclude_if=lambda v: v is None)

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        return check_relative_path(v)

    @field_validator("encoding")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        order = [ENCODINGS.index(e) if e in ENCODINGS else -1 for e in v]
        if -1 in order or not v:
            raise ValueError(f"unknown encoding {v!r}: use {', '.join(ENCODINGS)}")
        compressions = [e for e in v if e != "aesgcm"]
        if len(compressions) > 1 or v.count("aesgcm") > 1 or (v[-1] != "aesgcm" and "aesgcm" in v):
            raise ValueError(f"encoding {v!r}: at most one compression, then at most one encryption")
        return v

    @model_validator(mode="after")
    def _stored_fields(self) -> FileEntry:
        if self.encoding and (self.stored_size is None or self.stored_sha256 is None):
            raise ValueError(f"{self.path}: an encoded file needs stored_size and stored_sha256")
        return self

    @property
    def stored_bytes(self) -> int:
        """Size of the object in the store (the plaintext size for plain files)."""
        return self.stored_size if self.encoding and self.stored_size is not None else self.size


class TensorSpec(BaseModel):
    """A named input or output: Open Inference Protocol datatype and shape (-1: any)."""

    name: str
    datatype: str
    shape: list[int]


class Manifest(BaseModel):
    """What a version is: its files with their digests, and how to load them."""

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    format: str
    files: list[FileEntry]
    framework: str | None = None
    framework_version: str | None = None
    python_version: str | None = None
    created_at: str = Field(default_factory=now)
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    example: Any = None
    """One example input (rows), used for warm-up and as documentation."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Format-specific load options (for example a torch module's class path)."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Free-form: metrics, git sha, training data reference."""

    @field_validator("files")
    @classmethod
    def _unique(cls, v: list[FileEntry]) -> list[FileEntry]:
        seen: set[str] = set()
        for f in v:
            if f.path in seen:
                raise ValueError(f"duplicate file {f.path!r}")
            seen.add(f.path)
        # NOTE: "a" and "a/b" cannot both be files on disk; refused here rather than as an
        # OSError halfway through assembling the version in the cache.
        for f in v:
            parts = f.path.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                if folder in seen:
                    raise ValueError(f"{folder!r} is listed as a file and as a folder (of {f.path!r})")
        return v

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            # NOTE: pydantic wraps our InvalidManifest; surface the first reason plainly.
            raise InvalidManifest(f"invalid manifest: {_first_error(exc)}") from exc


def _plain(value: str, what: str) -> str:
    # NOTE: ValueError, so pydantic reports it as a validation error of that field.
    if not _NAME_RE.fullmatch(value) or value in {".", ".."}:
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-' (max 128)")
    return value


_SHA256 = "^[0-9a-f]{64}$"

MAX_SEQUENCE = 2**53 - 1
"""The largest alias sequence (what a JSON number holds exactly): ``2**200`` is refused."""


class AliasEntry(BaseModel):
    version: str
    manifest_sha256: str = Field(pattern=_SHA256)
    updated_at: str
    updated_by: str
    sequence: int | None = Field(default=None, ge=0, le=MAX_SEQUENCE, exclude_if=lambda v: v is None)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return _plain(v, "version")


MAX_ALIAS_EVENTS = 50
"""Rollout events an alias object keeps (the newest)."""

MAX_EVENT_DETAIL = 1000
"""Characters of one event's detail."""

ALIAS_EVENT_KINDS = ("shadow", "canary", "promoted", "aborted")


class AliasEvent(BaseModel):
    """One rollout step, promotion or abort, recorded in the alias object that it wrote.

    ``sequence`` is that object's: the event and the traffic change are one write.
    ``detail`` is what was judged (the step's figures) or why it stopped.
    """

    sequence: int = Field(ge=0, le=MAX_SEQUENCE)
    at: str = Field(max_length=64)
    by: str = Field(max_length=256)
    event: str = Field(pattern="^(" + "|".join(ALIAS_EVENT_KINDS) + ")$")
    version: str
    detail: str = Field(default="", max_length=MAX_EVENT_DETAIL)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return _plain(v, "version")


class CanaryTarget(BaseModel):
    """A second version taking ``weight`` percent of the alias's requests."""

    version: str
    manifest_sha256: str = Field(pattern=_SHA256)
    weight: float = Field(ge=0, le=100)
    """Percent of requests (0-100) routed to this version instead of the alias's ``version``."""

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return _plain(v, "version")


class ShadowTarget(BaseModel):
    """A version that sees a copy of ``fraction`` of the requests after the live reply is sent."""

    version: str
    manifest_sha256: str = Field(pattern=_SHA256)
    fraction: float = Field(ge=0, le=1)
    """Share of requests (0-1) mirrored to this version; its answers are compared, never returned."""

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return _plain(v, "version")


class Alias(BaseModel):
    """A movable pointer: ``production -> 7``, with the history for rollback.

    ``sequence``, ``expires_at`` and ``signatures`` are optional (readers that ignore
    them keep working): every move increments ``sequence``; a signed alias
    (:mod:`serving.signing`) lets replicas refuse one whose sequence goes backwards
    (a replayed old alias) or whose ``expires_at`` has passed (a frozen one).

    ``canary`` and ``shadow`` are optional too (progressive delivery): a reader
    that does not know them serves ``version`` to every request, which is what
    the alias meant before they existed. Unknown fields are ignored on read
    (pydantic's default), so a reader also keeps working on fields added later.
    A signature covers the whole object, ``canary`` and ``shadow`` included.
    """

    name: str
    alias: str
    version: str
    manifest_sha256: str = Field(pattern=_SHA256)
    updated_at: str = Field(default_factory=now)
    updated_by: str = "unknown"
    history: list[AliasEntry] = Field(default_factory=list)
    sequence: int | None = Field(default=None, ge=0, le=MAX_SEQUENCE, exclude_if=lambda v: v is None)
    """Incremented by every move, rollback included; absent on aliases written before it existed."""
    expires_at: str | None = Field(default=None, exclude_if=lambda v: v is None)
    """ISO 8601: a signed alias is refused after this (freeze protection)."""
    signatures: list[dict[str, str]] | None = Field(default=None, exclude_if=lambda v: v is None)
    """Ed25519 signatures over the rest of the object (serving.signing.sign_alias)."""
    canary: CanaryTarget | None = Field(default=None, exclude_if=lambda v: v is None)
    """A version taking ``weight`` percent of requests beside ``version`` (``serving alias set --canary``)."""
    shadow: ShadowTarget | None = Field(default=None, exclude_if=lambda v: v is None)
    """A version mirrored ``fraction`` of requests, its answers compared and discarded."""
    events: list[AliasEvent] | None = Field(default=None, exclude_if=lambda v: v is None)
    """Rollout steps, promotions and aborts, each with what was judged (the newest
    ``MAX_ALIAS_EVENTS``); ``serving alias get --json`` shows them. A record only: an entry
    this reader cannot use (another kind, too long) is dropped, never a reason to refuse
    the alias."""

    @field_validator("events", mode="before")
    @classmethod
    def _usable_events(cls, v: object) -> object:
        if not isinstance(v, list):
            return None
        kept = []
        for item in v[-MAX_ALIAS_EVENTS:]:
            try:
                kept.append(AliasEvent.model_validate(item))
            except ValidationError:
                continue
        return kept

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _plain(v, "model name")

    @model_validator(mode="after")
    def _split_is_another_version(self) -> Alias:
        for role, split in (("canary", self.canary), ("shadow", self.shadow)):
            if split is not None and split.version == self.version:
                raise ValueError(f"its {role} is its target, {self.version}; a {role} is another version")
        return self

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        return _plain(v, "alias")

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return _plain(v, "version")

    @property
    def seq(self) -> int:
        """The sequence number, 0 for an alias written before sequences existed."""
        return self.sequence or 0

    def moved_to(self, version: str, manifest_sha256: str, by: str, expires_at: str | None = None) -> Alias:
        """A new alias object pointing at ``version``, this target pushed to history."""
        previous = AliasEntry(
            version=self.version,
            manifest_sha256=self.manifest_sha256,
            updated_at=self.updated_at,
            updated_by=self.updated_by,
            sequence=self.sequence,
        )
        return Alias(
            name=self.name,
            alias=self.alias,
            version=version,
            manifest_sha256=manifest_sha256,
            updated_by=by,
            history=[*self.history, previous][-100:],
            sequence=self.seq + 1,
            expires_at=expires_at,
            events=self.events,
        )

    def with_split(
        self,
        by: str,
        *,
        canary: CanaryTarget | None,
        shadow: ShadowTarget | None,
        expires_at: str | None = None,
    ) -> Alias:
        """The same target with another canary and shadow (None drops one); a new sequence.

        The history is untouched: it records targets, and the target did not move.
        """
        return self.model_copy(
            update={
                "canary": canary,
                "shadow": shadow,
                "updated_by": by,
                "updated_at": now(),
                "sequence": self.seq + 1,
                "expires_at": expires_at,
                "signatures": None,
            }
        )

    def promoted(self, by: str, expires_at: str | None = None) -> Alias:
        """The canary becomes the target (the old target goes to history); no canary left.

        A shadow of the promoted version is dropped with it; another shadow stays.
        """
        if self.canary is None:
            raise ValueError(f"{self.name}@{self.alias} has no canary to promote")
        moved = self.moved_to(self.canary.version, self.canary.manifest_sha256, by, expires_at)
        if self.shadow is not None and self.shadow.version != self.canary.version:
            moved = moved.model_copy(update={"shadow": self.shadow})
        return moved

    def rolled_back(self, by: str, expires_at: str | None = None) -> Alias:
        """The alias moved to its last history entry, which is dropped; a new, higher sequence."""
        previous = self.history[-1]
        return Alias(
            name=self.name,
            alias=self.alias,
            version=previous.version,
            manifest_sha256=previous.manifest_sha256,
            updated_by=by,
            history=self.history[:-1],
            sequence=self.seq + 1,
            expires_at=expires_at,
            events=self.events,
        )

    def noted(self, event: str, version: str, detail: str, by: str) -> Alias:
        """This object with one more event, recorded under its own sequence (the newest kept)."""
        entry = AliasEvent(
            sequence=self.seq,
            at=now(),
            by=by,
            event=event,
            version=version,
            detail=detail[:MAX_EVENT_DETAIL],
        )
        events = [*(self.events or []), entry][-MAX_ALIAS_EVENTS:]
        return self.model_copy(update={"events": events, "signatures": None})

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Alias:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidManifest(f"invalid alias object: {_first_error(exc)}") from exc


@dataclass(frozen=True)
class ModelRef:
    """``name@alias`` or ``name:version``; a bare name means ``name@production``."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, ref: str, default_alias: str = "production") -> ModelRef:
        if not isinstance(ref, str) or not ref:
            raise InvalidReference("empty model reference")
        if ref.count("@") + ref.count(":") > 1:
            raise InvalidReference(f"malformed model reference {ref!r}: use NAME@ALIAS or NAME:VERSION")
        if "@" in ref:
            name, alias = ref.split("@")
            return cls(check_name(name, "model name"), alias=check_name(alias, "alias"))
        if ":" in ref:
            name, version = ref.split(":")
            return cls(check_name(name, "model name"), version=check_name(version, "version"))
        return cls(check_name(ref, "model name"), alias=default_alias)

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}:{self.version}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_sort_key(v: str) -> tuple[int, int, str]:
    """Integers sort numerically and before other strings."""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid"))
    return f"{loc}: {msg}" if loc else msg
