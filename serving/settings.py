"""The one place configuration and the environment are read.

Every field can be set through an environment variable named
``SERVING_<FIELD>`` (for example ``SERVING_STORE``, ``SERVING_CACHE_DIR``).
Standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...) are left
to boto3's own configuration chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("serving")) / "models"


class Settings(BaseSettings):
    """Process-wide settings, validated on parse."""

    model_config = SettingsConfigDict(env_prefix="SERVING_", extra="ignore")

    store: str = "./model-store"
    """Store URI: a folder path, ``file:///abs/path`` or ``s3://bucket/prefix``."""

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Node-local loader cache, shared by every process on the node."""

    cache_max_bytes: int = Field(default=20 * 1024**3, ge=0)
    """Byte budget of the cache; least recently used versions are evicted past it."""

    s3_addressing_style: str = Field(default="auto", pattern="^(auto|path|virtual)$")
    """``path`` for MinIO and most S3-compatible servers."""

    s3_connect_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for a TCP connection to the store."""

    s3_read_timeout: float = Field(default=30.0, gt=0)
    """Seconds to wait for a read from the store."""

    s3_max_attempts: int = Field(default=4, ge=1)
    """Attempts per request, with boto3's ``standard`` retry mode."""

    s3_multipart_threshold: int = Field(default=64 * 1024**2, ge=5 * 1024**2)
    """Files larger than this are transferred in parts."""

    # -- OCI registry store (SERVING_STORE=oci://registry/namespace; serving.store.oci) ---------------
    oci_username: str | None = None
    """Registry user, with ``oci_password_file``; unset: the Docker config's entry, else anonymous."""

    oci_password_file: Path | None = None
    """A file holding the registry password or token (a mounted Secret)."""

    oci_docker_config: Path | None = None
    """A Docker ``config.json`` (``auths`` entries); default: ``$DOCKER_CONFIG`` or ``~/.docker``'s."""

    oci_ca_file: Path | None = None
    """CA certificates (PEM) that the registry's TLS certificate must chain to; unset: the system roots."""

    oci_plain_http: bool = False
    """Talk plain HTTP to the registry (a loopback or in-cluster registry without TLS)."""

    oci_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds a registry read may stall before the request fails (connect: ``s3_connect_timeout``)."""

    trusted_globals: list[str] = Field(default_factory=list)
    """Extra ``module.qualname`` globals the restricted unpickler may load, and
    extra types a ``skops`` file may use beyond skops's default trusted types.

    Widening this list lets a pickle call those objects: add only what a model
    you trust needs, and review it like code."""

    allow_legacy_h5: bool = False
    """Load Keras ``.h5`` files, which bypass Keras safe mode (runs code). Applies on top
    of the rules for every unrestricted format: only signed versions of models listed
    in ``unrestricted_models`` (SECURITY.md, "Load policy")."""

    max_artifact_bytes: int = Field(default=50 * 1024**3, ge=1)
    """Refuse versions whose files add up to more than this, counting both the stored
    (compressed or encrypted) size and the plaintext size, before anything is downloaded."""

    max_expansion_ratio: float = Field(default=100.0, gt=1)
    """A file that decompresses while it loads (joblib's own compression, the zip members
    of skops, Keras and torch files) may expand to this many times its size on disk
    (64 MiB at least, ``max_artifact_bytes`` at most); past it the load is refused."""

    max_metadata_bytes: int = Field(default=4 * 1024**2, ge=1024)
    """The largest ``manifest.json`` or alias object read from the store."""

    max_artifact_files: int = Field(default=10_000, ge=1)
    """Refuse versions with more files than this."""

    max_concurrent_version_loads: int = Field(default=1, ge=1)
    """Loads of explicitly requested versions (``/v2/models/M/versions/V/...``) one replica
    runs at once; a request for another version beyond that gets 503 with ``Retry-After``."""

    version_miss_ttl_s: float = Field(default=10.0, ge=0)
    """Seconds a requested version that does not exist is remembered as missing, so repeating
    it costs no store request."""

    cache_hash_on_load: bool = True
    """Re-hash every file of a cached version each time it is loaded into a process (a
    start, a swap, an explicit version), so a byte changed with its size, mtime and inode
    put back (bit rot, a careful write) never reaches a model. It costs one read of the
    files per load (``python -m bench.rehash``); false trusts the stat stamp for
    ``cache_reverify_s`` instead."""

    cache_reverify_s: float = Field(default=24 * 3600.0, ge=0)
    """Where files are not re-hashed at load (``serving pull``, or ``cache_hash_on_load``
    off), a cached version whose files look unchanged (size, mtime, inode) is still
    re-hashed in full once this long after its last full check; 0 re-hashes every time."""

    pull_timeout_s: float = Field(default=3600.0, gt=0)
    """A version's whole pull (every file) must finish within this many seconds, or it is
    abandoned, its partial files removed, and retried with backoff."""

    pull_min_bytes_per_s: float = Field(default=64 * 1024, ge=0)
    """Over every ``pull_rate_window_s`` of a store read, at least this many bytes per second
    must arrive, or the pull is abandoned even inside a blocked read (a store that trickles);
    time between reads (hashing a blob another version shares) does not count. 0 turns the
    rate check off."""

    pull_rate_window_s: float = Field(default=30.0, gt=0)
    """The window the minimum pull rate is measured over."""

    alias_check_timeout_s: float = Field(default=10.0, gt=0)
    """An alias check that has not answered within this many seconds is abandoned, and the
    watcher goes on (the next check starts a fresh request)."""

    # -- HTTP connections of the standalone server (serving.server.connections) ------
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    """A request's headers must arrive within this many seconds of its first byte (of the
    connection, for the first request), or the connection is closed."""

    http_keep_alive_s: float = Field(default=5.0, gt=0)
    """An idle kept-alive connection is closed after this many seconds."""

    http_max_connections: int = Field(default=10_000, ge=1)
    """Past this many open connections, a new one closes the longest-idle connection (one
    with no request in progress); only when every one is busy is the new one refused."""

    progress: bool = True
    """Show progress bars for transfers above a few MB when stderr is a TTY."""

    # -- trust (SECURITY.md) ---------------------------------------------------
    require_signature: bool = False
    """Refuse versions without a valid signature by one of ``trusted_keys``.

    Checked on the manifest before any file is downloaded or deserialized."""

    trusted_keys: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Ed25519 public keys (PEM): files or directories, comma-separated in the env.

    A directory is read whole, so a mounted Kubernetes Secret works:
    ``SERVING_TRUSTED_KEYS=/etc/serving/trusted-keys``."""

    require_oms_signature: bool = False
    """Refuse versions without an OpenSSF model signature (OMS) by one of the ``oms_*`` signers.

    Checked on the manifest before any file is downloaded: the signed statement must list
    exactly the manifest's files and SHA-256s (serving.oms)."""

    oms_public_keys: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """OMS signers by EC public key (PEM): files or directories, comma-separated in the env."""

    oms_certificate_chains: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """OMS signers by certificate: CA certificates (PEM) the signing certificate must chain to."""

    oms_sigstore_identity: str | None = None
    """An OMS signer by Sigstore identity (an email or a workload URI), with ``oms_sigstore_issuer``."""

    oms_sigstore_issuer: str | None = None
    """The OIDC issuer of ``oms_sigstore_identity`` (``https://accounts.google.com``, ...)."""

    oms_sigstore_trust_config: Path | None = None
    """The Sigstore trust root (ClientTrustConfig JSON), mounted: nothing is fetched at load."""

    unrestricted_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Models allowed to use formats that run code on load (arbitrary pickle, Keras
    ``.h5``, SavedModel), comma-separated. Applies to signed versions only."""

    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("SERVING_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI")
    )
    """MLflow tracking server that ``serving import mlflow`` reads models from
    (MLflow's own ``MLFLOW_TRACKING_URI``); ``--tracking-uri`` overrides it."""

    # -- encryption at rest (SECURITY.md) -----------------------------------------
    encryption_key_file: Path | None = None
    """Client-side encryption key (base64 of 32 random bytes, ``serving keygen --kek``):
    encrypts on ``publish --encrypt`` and decrypts into the cache on pull. Mount it
    from a Secret; it never appears in logs or errors (only its ``local:`` id)."""

    encryption_key: SecretStr | None = None
    """The same key given inline (base64), for environments without a key file."""

    encryption_kms_key_id: str | None = None
    """AWS KMS key (id, ARN or alias) that wraps per-file data keys instead of a local
    key; pulls need ``kms:Decrypt`` on it. Uses boto3's credential chain."""

    s3_sse: str | None = Field(default=None, pattern="^(AES256|aws:kms)$")
    """Server-side encryption requested on every upload: ``AES256`` (SSE-S3) or
    ``aws:kms`` (SSE-KMS, with ``s3_sse_kms_key_id`` or the bucket's default key)."""

    s3_sse_kms_key_id: str | None = None
    """KMS key for ``s3_sse=aws:kms`` uploads."""

    s3_sse_c_key: SecretStr | None = None
    """SSE-C: a customer key (base64 of 32 bytes) sent with every upload and download;
    S3 keeps no copy, so objects are unreadable without it. Needs HTTPS on real S3."""

    # -- isolation of first loads (SECURITY.md, "Isolation") -----------------------
    isolation_memory_bytes: int | None = Field(default=None, ge=64 * 1024**2)
    """Address-space budget of the child that loads a new version first, on top of
    what the helper process already maps. Default: the larger of 1 GiB and four
    times the version's total bytes."""

    isolation_cpu_seconds: int = Field(default=120, ge=1)
    """CPU seconds the isolated load and warm-up may use (``RLIMIT_CPU``)."""

    isolation_timeout_s: float = Field(default=300.0, gt=0)
    """Wall-clock seconds the isolated load and warm-up may take before the child is killed."""

    isolation_nice: int = Field(default=10, ge=0, le=19)
    """Niceness of the isolation helper and its probe children. A probe runs while
    the live version serves; at 10 it gets about a tenth of a core that requests
    also want, so a swap on a busy node takes longer and requests do not wait for it."""

    worker_start: Literal["fork", "spawn"] = "fork"
    """How a model worker starts: ``fork`` (from a zygote that imported the loaders and the
    version's framework once: about 0.25 s to a loaded iris worker, after the zygote's own
    start) or ``spawn`` (a new interpreter each time, about 2.2 s). Forked workers share one
    memory layout (SECURITY.md, "Model workers")."""

    # -- admin routes ----------------------------------------------------------------
    admin_token: SecretStr | None = None
    """When set, ``POST /v2/repository/models/{name}/load`` requires
    ``Authorization: Bearer <token>`` (401 without one, 403 with another)."""

    admin_token_file: Path | None = None
    """The same token read from a file (a mounted Kubernetes Secret); wins over
    ``admin_token``. Read once, when the server starts."""

    def admin_token_value(self) -> str | None:
        """The admin token from ``admin_token_file`` or ``admin_token``, without surrounding
        whitespace (a Secret made ``--from-file`` ends in a newline); None when neither is set.

        Fails closed: a token that is set but empty or only whitespace, in the file or in the
        variable, is refused rather than read as "no token" (which leaves the routes open).

        Raises:
            InvalidRequest: the file cannot be read, or a token is set but empty.
        """
        from serving.errors import InvalidRequest

        if self.admin_token_file is not None:
            try:
                token = self.admin_token_file.read_text().strip()
            except OSError as exc:
                raise InvalidRequest(f"cannot read SERVING_ADMIN_TOKEN_FILE: {exc.strerror}") from exc
            if not token:
                raise InvalidRequest(f"SERVING_ADMIN_TOKEN_FILE {self.admin_token_file} is empty")
            return token
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value().strip()
            if not token:
                raise InvalidRequest(
                    "SERVING_ADMIN_TOKEN is set but empty; set a token, or unset it to leave the admin "
                    "routes open"
                )
            return token
        return None

    @field_validator(
        "trusted_keys", "unrestricted_models", "oms_public_keys", "oms_certificate_chains", mode="before"
    )
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


_CHILD_ENV_KEEP = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "TMPDIR",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "TORCH_FORCE_WEIGHTS_ONLY_LOAD",
    }
)
_CHILD_ENV_KEEP_PREFIXES = ("LC_", "OPENBLAS_", "MKL_")


def isolated_child_env() -> dict[str, str]:
    """The environment a model-loading child gets: locale, paths and thread counts only.

    Everything else (``SERVING_*`` keys, ``AWS_*`` credentials, tokens) stays in
    this process, so code that a hostile artifact manages to run in the child
    finds no secret in its environment.
    """
    return {
        k: v for k, v in os.environ.items() if k in _CHILD_ENV_KEEP or k.startswith(_CHILD_ENV_KEEP_PREFIXES)
    }


def get_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit overrides winning."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]  # NOTE: validated by pydantic
