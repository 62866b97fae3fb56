"""An OCI registry as the model store (``oci://registry[:port]/namespace``), through ``oras``.

Each model is a repository, ``<namespace>/<model>``; each version is an OCI artifact tagged with
its version. The artifact's config is this project's ``manifest.json`` and each file is a layer
with a ModelPack media type, so any OCI tool can copy, mirror, scan or pull a version::

    oras pull registry.example.com/ml/iris:7      # the files, named by their layer titles

=====================================  ==================================================
this project                           OCI
=====================================  ==================================================
model ``iris``                         repository ``<namespace>/iris`` (lowercase only)
version ``iris:7``                     tag ``7``: an image manifest, ``artifactType``
                                       ``application/vnd.serving.model.v1``
``manifest.json``                      its config, ``application/vnd.serving.manifest.v1+json``
a file ``model.onnx``                  a layer, ``org.opencontainers.image.title: model.onnx``;
                                       ModelPack media type: ``application/vnd.cncf.model.``
                                       ``weight.v1.raw``, ``...weight.config.v1.raw`` (JSON, YAML,
                                       tokenizer files), ``...doc.v1.raw`` (README, licence),
                                       ``...code.v1.raw`` (``.py``)
``manifest.sig``, ``oms.sig``          tags ``_sig.7``, ``_oms.7``: one-layer artifacts
alias ``iris@production``              tag ``_alias.production``: a one-layer artifact holding
                                       the alias object; replicas follow it by digest
                                       (a ``HEAD`` per poll), as they follow an S3 ETag
=====================================  ==================================================

Bytes are checked before anything reads them, as with every store: the loader cache checks each
downloaded layer against the manifest's SHA-256 (which is also the layer's digest for a file
stored plain).

**No compare-and-swap.** The distribution API has no conditional tag write. A conditional
:meth:`OciStore.put` reads the tag's digest, writes, then reads it back: a writer that lost the
race learns it (:class:`~serving.errors.StoreConflict`), but two writers within one round trip
can both see their write land. Serialize alias writers (one release job) on an OCI store.

Auth: a user and a password file (a mounted Secret), else the Docker config
(``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, ``auths`` entries; credential
helpers are not run), else anonymous; token (Bearer) and Basic challenges are both answered by
oras. TLS verifies against ``oci_ca_file`` when set (a private CA), else the system roots;
``oci_plain_http`` is for loopback registries.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from serving.errors import (
    InvalidReference,
    MissingExtra,
    NotFound,
    StoreAccessDenied,
    StoreConflict,
    StoreError,
    StoreUnavailable,
)
from serving.settings import Settings
from serving.store.base import MAX_GET_BYTES, ObjectInfo, ObjectStore, Progress, Sink, check_get_size

__all__ = ["MODEL_ARTIFACT_TYPE", "OciStore", "layer_media_type"]

log = logging.getLogger(__name__)

MODEL_ARTIFACT_TYPE = "application/vnd.serving.model.v1"
MANIFEST_MEDIA_TYPE = "application/vnd.serving.manifest.v1+json"
OBJECT_ARTIFACT_TYPE = "application/vnd.serving.object.v1"
OBJECT_MEDIA_TYPE = "application/vnd.serving.object.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = {
    "mediaType": "application/vnd.oci.empty.v1+json",
    "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
    "size": 2,
}
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"
KEY = "dev.serving.key"
MAX_PAGES = 1000
"""Pages of a listing followed at most (1,000 entries each): a registry's links cannot loop us."""
CHUNKED_ABOVE = 16 * 1024**2
"""Files above this go up in chunks (PATCH), so a large model is never read into memory whole."""

_MODELPACK = "application/vnd.cncf.model."
_CONFIG_SUFFIXES = {".json", ".yaml", ".yml", ".toml", ".txt", ".model", ".vocab", ".tiktoken"}
_DOC_NAMES = re.compile(r"^(readme|license|licence|notice|model_card)(\..*)?$", re.IGNORECASE)
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_SMALL = {"manifest.sig": "_sig.", "oms.sig": "_oms."}


def layer_media_type(path: str) -> str:
    """The ModelPack media type of a model file, from its name."""
    name = PurePosixPath(path).name
    if _DOC_NAMES.match(name) or name.endswith(".md"):
        return _MODELPACK + "doc.v1.raw"
    suffix = PurePosixPath(name).suffix.lower()
    if suffix == ".py":
        return _MODELPACK + "code.v1.raw"
    if suffix in _CONFIG_SUFFIXES:
        return _MODELPACK + "weight.config.v1.raw"
    return _MODELPACK + "weight.v1.raw"


@dataclass(frozen=True)
class _Where:
    """Where a key lives: a model repository, and a tag there (plus a file, for version files)."""

    model: str
    tag: str
    file: str | None = None
    """A file of the version tagged ``tag`` (None: the tag's own object)."""
    version_manifest: bool = False
    """The key is a version's manifest.json: the tagged artifact's config."""


class OciStore(ObjectStore):
    """``oci://registry[:port]/namespace``: see the module docstring for the layout."""

    def __init__(self, uri: str, settings: Settings) -> None:
        try:
            import oras.provider
        except ImportError as exc:
            raise MissingExtra("an oci:// store needs oras: pip install 'serving[oci]'") from exc

        parsed = urlparse(uri)
        namespace = parsed.path.strip("/")
        if parsed.scheme != "oci" or not parsed.netloc:
            raise InvalidReference("invalid OCI store: use oci://registry[:port]/namespace")
        if "@" in parsed.netloc:
            raise InvalidReference(
                "an OCI store address takes no login: use SERVING_OCI_USERNAME and "
                "SERVING_OCI_PASSWORD_FILE, or a Docker config"
            )
        if namespace and not all(_REPO_COMPONENT.fullmatch(p) for p in namespace.split("/")):
            raise InvalidReference(
                f"invalid OCI namespace {namespace!r}: lowercase letters, digits, '.', '_', '-'"
            )
        self.uri = f"oci://{parsed.netloc}/{namespace}".rstrip("/")
        self.host = parsed.netloc
        self.namespace = namespace
        self.max_get_bytes = settings.max_metadata_bytes or MAX_GET_BYTES
        verify: bool | str = str(settings.oci_ca_file) if settings.oci_ca_file else True
        self._registry = oras.provider.Registry(
            hostname=self.host, insecure=settings.oci_plain_http, tls_verify=verify, auth_backend="token"
        )
        # NOTE: requests has no default timeout (a stalled registry would hang a replica's poll), and
        # oras retries every failed request 5 times over 2 minutes: one try here, the caller decides.
        timeout = (settings.s3_connect_timeout, settings.oci_timeout_s)
        session = self._registry.session
        session.request = functools.partial(session.request, timeout=timeout)  # type: ignore[method-assign,unused-ignore]
        unwrapped = getattr(
            oras.provider.Registry.do_request, "__wrapped__", oras.provider.Registry.do_request
        )
        self._raw_request = types.MethodType(unwrapped, self._registry)
        # NOTE: every request oras makes (uploads included) goes through _send
        self._registry.do_request = self._send  # type: ignore[method-assign,assignment,unused-ignore]
        self._credentials = _credentials(self.host, settings)
        if self._credentials is not None:
            self._registry.auth.set_basic_auth(*self._credentials)
        self._verify = verify
        self._auth_checked = False
        self._basic = False
        self._scheme = "http" if settings.oci_plain_http else "https"
        self._staged: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    # -- keys ---------------------------------------------------------------
    def _repo(self, model: str) -> str:
        if not _REPO_COMPONENT.fullmatch(model):
            raise InvalidReference(
                f"model {model!r} cannot be an OCI repository: registries take lowercase letters, digits "
                "and single separators ('.', '_', '-') only"
            )
        return f"{self.namespace}/{model}" if self.namespace else model

    def _where(self, key: str) -> _Where:
        where = self._place(key)
        if len(where.tag) > 128:
            raise InvalidReference(
                f"{key!r} would be the tag {where.tag[:40]}..., over a registry's 128 characters: "
                "use a shorter version or alias name"
            )
        return where

    @staticmethod
    def _place(key: str) -> _Where:
        parts = key.split("/")
        if parts[0] == "_feed" and len(parts) == 3:
            return _Where(parts[2], "_feed." + parts[1])
        if len(parts) >= 3 and parts[1] == "versions":
            model, version, rest = parts[0], parts[2], "/".join(parts[3:])
            if rest == "manifest.json":
                return _Where(model, version, version_manifest=True)
            if rest in _SMALL:
                return _Where(model, _SMALL[rest] + version)
            if rest:
                return _Where(model, version, file=rest)
        if len(parts) == 3 and parts[1] == "aliases" and parts[2].endswith(".json"):
            return _Where(parts[0], "_alias." + parts[2].removesuffix(".json"))
        if len(parts) == 3 and parts[1] == "repairs" and parts[2].endswith(".json"):
            return _Where(parts[0], "_repair." + parts[2].removesuffix(".json"))
        raise InvalidReference(f"{key!r} has no place in an OCI store")

    def _url(self, model: str, tail: str) -> str:
        return f"{self._scheme}://{self.host}/v2/{self._repo(model)}/{tail}"

    # -- requests -----------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import requests

        try:
            yield
        except (NotFound, StoreError, InvalidReference):
            raise
        except requests.exceptions.SSLError as exc:
            raise StoreUnavailable(f"{what}: TLS verification failed for {self.host}: {exc}") from exc
        except requests.exceptions.RequestException as exc:
            raise StoreUnavailable(f"{what}: cannot reach {self.host}: {type(exc).__name__}") from exc
        except ValueError as exc:
            # NOTE: oras raises ValueError for a refused login and a failed response check
            raise StoreError(f"{what}: {exc}") from exc

    def _check_auth(self, what: str) -> None:
        """Answer the registry's kind of challenge: oras's token backend for Bearer, its basic one for Basic.

        NOTE: asked once, lazily, so that a store opens while the registry is down (the cache
        serves from what it holds).
        """
        if self._auth_checked:
            return
        import oras.auth

        with self._errors(what):
            response = self._registry.session.get(
                f"{self._scheme}://{self.host}/v2/", verify=self._verify, allow_redirects=False
            )
        if response.status_code >= 500 or response.status_code == 429:
            # NOTE: not decided yet: the next request asks again
            raise StoreUnavailable(f"{what}: the registry {self.host} answered {response.status_code}")
        challenge = response.headers.get("Www-Authenticate", "")
        if response.status_code == 401 and challenge.lower().startswith("basic"):
            if self._credentials is None:
                raise StoreAccessDenied(
                    f"{what}: the registry {self.host} asks for a login: set SERVING_OCI_USERNAME and "
                    "SERVING_OCI_PASSWORD_FILE, or a Docker config"
                )
            backend = oras.auth.get_auth_backend(
                "basic", self._registry.session, self._scheme == "http", tls_verify=self._verify
            )
            backend.set_basic_auth(*self._credentials)
            self._registry.auth = backend
            self._basic = True
        self._auth_checked = True

    def _send(
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> Any:
        """oras's request with auth, and what oras leaves out of it.

        NOTE: oras keeps one Bearer token and resends it on a 401; registries scope tokens per
        repository and action (pull, push) and expire them, so a 401 asks for a fresh token for
        the scope it names, once. With Basic auth the header goes on every request up front
        (oras sends each one bare first, bodies included).
        """
        sent = dict(headers or {})
        if self._basic:
            sent.update(self._registry.auth.get_auth_header())
        kwargs = {"data": data, "json": json, "stream": stream}
        response = self._raw_request(url, method, headers=dict(sent), **kwargs)
        if response.status_code == 401 and not self._basic and self._credentials_or_token():
            response.close()
            self._registry.auth.token = None
            response = self._raw_request(url, method, headers=dict(sent), **kwargs)
        return response

    def _credentials_or_token(self) -> bool:
        return getattr(self._registry.auth, "token", None) is not None

    def _request(self, method: str, url: str, what: str, **kwargs: Any) -> Any:
        self._check_auth(what)
        with self._errors(what):
            try:
                response = self._send(url, method, **kwargs)
            except ValueError as exc:
                if "authentication" in str(exc).lower():
                    raise StoreAccessDenied(f"{what}: the registry {self.host} refused the login") from None
                raise
        status = response.status_code
        if status in (401, 403) or status >= 500 or status == 429:
            response.close()
        if status in (401, 403):
            raise StoreAccessDenied(f"{what}: the registry {self.host} refused the credentials ({status})")
        if status >= 500 or status == 429:
            raise StoreUnavailable(f"{what}: the registry {self.host} answered {status}")
        return response

    def _manifest(
        self, model: str, ref: str, what: str, head: bool = False
    ) -> tuple[dict[str, Any] | None, str]:
        """The image manifest tagged ``ref`` (None with ``head``) and its digest; NotFound when absent."""
        response = self._request(
            "HEAD" if head else "GET",
            self._url(model, f"manifests/{ref}"),
            what,
            headers={"Accept": OCI_MANIFEST},
            stream=True,
        )
        with contextlib.closing(response):
            if response.status_code == 404:
                raise NotFound(f"{what}: not found in {self.uri}")
            if response.status_code in (400, 406):
                # NOTE: a tag that holds no OCI image manifest (a Docker image, an index): no version of ours
                raise NotFound(f"{what}: {ref} is not an OCI image manifest in {self.uri}")
            if response.status_code != 200:
                raise StoreError(f"{what}: the registry answered {response.status_code}")
            digest = response.headers.get("Docker-Content-Digest", "")
            if head and digest:
                return None, digest
            if head:
                response.close()
                # NOTE: a registry that sends no digest on HEAD: the body's own digest is the tag's
                return None, self._manifest(model, ref, what)[1]
            body = _read_at_most(response, self.max_get_bytes, what)
        computed = "sha256:" + hashlib.sha256(body).hexdigest()
        if digest and digest != computed:
            raise StoreError(f"{what}: the registry sent a manifest that does not match its digest")
        try:
            manifest = json.loads(body)
        except ValueError as exc:
            raise StoreError(f"{what}: the manifest is not JSON") from exc
        if not isinstance(manifest, dict) or not _descriptor(manifest.get("config")):
            raise StoreError(f"{what}: {ref} is not an OCI image manifest with a config")
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not all(_descriptor(layer) for layer in layers):
            raise StoreError(f"{what}: {ref} has malformed layers")
        return manifest, computed

    def _version(self, model: str, tag: str, what: str) -> tuple[dict[str, Any], str]:
        """A version's artifact; NotFound for any other image under the tag (``latest``, a mirror)."""
        manifest, digest = self._manifest(model, tag, what)
        assert manifest is not None
        if manifest["config"].get("mediaType") != MANIFEST_MEDIA_TYPE:
            raise NotFound(
                f"{what}: {model}:{tag} is not a serving version (its config is not a manifest.json)"
            )
        return manifest, digest

    def _blob(self, model: str, descriptor: dict[str, Any], what: str, limit: int | None = None) -> bytes:
        size = int(descriptor.get("size", -1))
        if limit is not None:
            check_get_size(what, size, limit)
        response = self._request("GET", self._url(model, f"blobs/{descriptor['digest']}"), what, stream=True)
        with contextlib.closing(response):
            if response.status_code == 404:
                raise NotFound(f"{what}: blob {descriptor['digest'][:19]} missing from {self.uri}")
            if response.status_code != 200:
                raise StoreError(f"{what}: the registry answered {response.status_code}")
            data = _read_at_most(response, size, what)
        if "sha256:" + hashlib.sha256(data).hexdigest() != descriptor["digest"] or len(data) != size:
            raise StoreError(f"{what}: the registry sent a blob that does not match its digest")
        return data

    def _push_blob(
        self, model: str, path: Path, media_type: str, annotations: dict[str, str]
    ) -> dict[str, Any]:
        self._check_auth(f"upload {path.name}")
        digest, size = _digest_file(path)
        layer = {"mediaType": media_type, "digest": digest, "size": size, "annotations": annotations}
        with self._errors(f"upload {path.name}"):
            response = self._registry.upload_blob(
                str(path),
                self._registry.get_container(self._repo(model)),
                layer,
                do_chunked=size > CHUNKED_ABOVE,
            )
        if response.status_code not in (200, 201, 202):
            if response.status_code in (401, 403):
                raise StoreAccessDenied(
                    f"upload {path.name}: the registry {self.host} refused the credentials"
                )
            raise StoreError(f"upload {path.name}: the registry answered {response.status_code}")
        return layer

    def _push_bytes(
        self, model: str, data: bytes, media_type: str, annotations: dict[str, str]
    ) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="serving-oci-") as scratch:
            path = Path(scratch) / "blob"
            path.write_bytes(data)
            return self._push_blob(model, path, media_type, annotations)

    def _put_manifest(self, model: str, tag: str, manifest: dict[str, Any], what: str) -> str:
        body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        response = self._request(
            "PUT",
            self._url(model, f"manifests/{tag}"),
            what,
            data=body,
            headers={"Content-Type": OCI_MANIFEST},
        )
        if response.status_code not in (200, 201):
            text = " ".join(response.text[:200].split())
            raise StoreError(f"{what}: the registry refused the manifest ({response.status_code}: {text})")
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def _tags(self, model: str) -> list[str]:
        """Every tag of the model's repository; [] when the repository does not exist."""
        tags: list[str] = []
        url: str | None = self._url(model, "tags/list?n=1000")
        for _ in range(MAX_PAGES):
            if not url:
                break
            response = self._request("GET", url, f"list {model}")
            if response.status_code == 404:
                return []
            if response.status_code != 200:
                raise StoreError(f"list {model}: the registry answered {response.status_code}")
            tags.extend(t for t in _json_list(response, "tags", f"list {model}") if isinstance(t, str))
            url = self._next(response)
        return tags

    def _models(self) -> list[str]:
        """The models under the namespace, from the registry's catalog."""
        names: list[str] = []
        url: str | None = f"{self._scheme}://{self.host}/v2/_catalog?n=1000"
        prefix = f"{self.namespace}/" if self.namespace else ""
        for _ in range(MAX_PAGES):
            if not url:
                break
            response = self._request("GET", url, "list models")
            if response.status_code != 200:
                raise StoreError(f"list models: the registry's catalog answered {response.status_code}")
            for repo in _json_list(response, "repositories", "list models"):
                if not isinstance(repo, str):
                    continue
                rest = repo[len(prefix) :] if repo.startswith(prefix) else None
                if rest and "/" not in rest:
                    names.append(rest)
            url = self._next(response)
        return sorted(names)

    def _next(self, response: Any) -> str | None:
        """The next page's URL: on this registry only (credentials never follow a link elsewhere)."""
        link = response.links.get("next", {}).get("url")
        if not link:
            return None
        if link.startswith("/") and not link.startswith("//"):
            return f"{self._scheme}://{self.host}{link}"
        parsed = urlparse(link)
        if parsed.scheme != self._scheme or parsed.netloc != self.host:
            raise StoreError(
                f"the registry {self.host} sent a next-page link to another place: {parsed.netloc}"
            )
        return str(link)

    # -- ObjectStore --------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str]:
        where = self._where(key)
        if where.version_manifest:
            version, digest = self._version(where.model, where.tag, f"read {key}")
            return self._blob(where.model, version["config"], f"read {key}", self.max_get_bytes), digest
        manifest, digest = self._manifest(where.model, where.tag, f"read {key}")
        assert manifest is not None
        if where.file is not None:
            raise InvalidReference(f"{key}: read version files with download()")
        layers = manifest.get("layers") or []
        if len(layers) != 1:
            raise StoreError(f"read {key}: expected one layer, the registry holds {len(layers)}")
        return self._blob(where.model, layers[0], f"read {key}", self.max_get_bytes), digest

    def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes | None, str]:
        where = self._where(key)
        _, digest = self._manifest(where.model, where.tag, f"check {key}", head=True)
        if etag is not None and digest == etag:
            return None, etag
        return self.get(key)

    def put(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> None:
        where = self._where(key)
        what = f"write {key}"
        if where.file is not None:
            raise InvalidReference(f"{key}: write version files with upload()")
        if where.version_manifest:
            manifest = self._version_artifact(where, data)
        else:
            layer = self._push_bytes(where.model, data, OBJECT_MEDIA_TYPE, {KEY: key})
            self._push_bytes(where.model, b"{}", EMPTY_MEDIA_TYPE, {})
            manifest = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": OBJECT_ARTIFACT_TYPE,
                "config": EMPTY,
                "layers": [layer],
                "annotations": {KEY: key},
            }
        current = self._current(where, what)
        if if_absent and current is not None:
            raise FileExistsError(key)
        if if_match is not None and current != if_match:
            raise StoreConflict(f"{what}: changed since it was read")
        mine = self._put_manifest(where.model, where.tag, manifest, what)
        if (if_absent or if_match is not None) and self._current(where, what) != mine:
            # NOTE: another writer's tag landed after ours: the registry has no conditional write
            raise StoreConflict(f"{what}: another writer moved the tag at the same time")
        if where.version_manifest:
            with self._lock:
                self._staged.pop((where.model, where.tag), None)

    def _current(self, where: _Where, what: str) -> str | None:
        try:
            return self._manifest(where.model, where.tag, what, head=True)[1]
        except NotFound:
            return None

    def _version_artifact(self, where: _Where, raw: bytes) -> dict[str, Any]:
        """The image manifest of a version: its staged files as layers, ``manifest.json`` as config."""
        with self._lock:
            staged = dict(self._staged.get((where.model, where.tag), {}))
        declared = {
            entry["path"]: entry.get("stored_sha256") or entry["sha256"]
            for entry in json.loads(raw).get("files", [])
        }
        for path, sha in sorted(declared.items()):
            layer = staged.get(path)
            if layer is None:
                raise StoreError(f"{where.model}:{where.tag}: {path!r} was not uploaded by this process")
            if layer["digest"] != f"sha256:{sha}":
                raise StoreError(f"{where.model}:{where.tag}: {path!r} was uploaded with other bytes")
        config = self._push_bytes(where.model, raw, MANIFEST_MEDIA_TYPE, {})
        config.pop("annotations", None)
        return {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": MODEL_ARTIFACT_TYPE,
            "config": config,
            "layers": [staged[path] for path in sorted(declared)],  # NOTE: what the manifest lists, only
            "annotations": {"dev.serving.name": where.model, "dev.serving.version": where.tag},
        }

    def upload(self, key: str, path: Path, progress: Progress | None = None) -> None:
        where = self._where(key)
        if where.file is None:
            raise InvalidReference(f"{key}: upload() takes version files only")
        annotations = {TITLE: where.file, FILEPATH: where.file}
        layer = self._push_blob(where.model, Path(path), layer_media_type(where.file), annotations)
        with self._lock:
            self._staged.setdefault((where.model, where.tag), {})[where.file] = layer
        if progress is not None:
            progress(layer["size"])

    def download(self, key: str, sink: Sink, progress: Progress | None = None) -> None:
        where = self._where(key)
        if where.file is None:
            data, _ = self.get(key)
            sink.write(data)
            return
        manifest, _ = self._version(where.model, where.tag, f"read {key}")
        layer = _layer(manifest, where.file)
        if layer is None:
            raise NotFound(f"{key}: no such file in {self.uri}")
        what = f"download {key}"
        response = self._request("GET", self._url(where.model, f"blobs/{layer['digest']}"), what, stream=True)
        with self._errors(what), contextlib.closing(response):
            if response.status_code == 404:
                raise NotFound(f"{what}: blob missing from {self.uri}")
            if response.status_code != 200:
                raise StoreError(f"{what}: the registry answered {response.status_code}")
            for chunk in response.iter_content(chunk_size=1 << 20):
                sink.write(chunk)
                if progress is not None:
                    progress(len(chunk))

    def exists(self, key: str) -> bool:
        where = self._where(key)
        try:
            if where.file is None and not where.version_manifest:
                self._manifest(where.model, where.tag, f"check {key}", head=True)
                return True
            manifest, _ = self._version(where.model, where.tag, f"check {key}")
        except NotFound:
            return False
        return where.file is None or _layer(manifest, where.file) is not None

    def list(self, prefix: str) -> list[ObjectInfo]:
        parts = prefix.split("/")
        if parts[0] == "_feed" and len(parts) >= 2 and parts[1]:
            return self._list_feed(parts[1], prefix)
        model = parts[0]
        if not model or model.startswith("_"):
            return []
        tags = self._tags(model)
        out: list[ObjectInfo] = []
        if len(parts) >= 3 and parts[1] == "versions" and parts[2]:
            version = parts[2]
            if version not in tags:
                return []
            try:
                manifest, digest = self._version(model, version, f"list {prefix}")
            except NotFound:
                return []
            base = f"{model}/versions/{version}/"
            out.append(ObjectInfo(base + "manifest.json", int(manifest["config"]["size"]), digest))
            for layer in manifest.get("layers") or []:
                title = (layer.get("annotations") or {}).get(TITLE)
                if title:
                    out.append(ObjectInfo(base + title, int(layer["size"])))
            for name, tag_prefix in _SMALL.items():
                if tag_prefix + version in tags:
                    out.append(ObjectInfo(base + name, 0))
        else:
            for tag in tags:
                if tag.startswith("_alias."):
                    out.append(ObjectInfo(f"{model}/aliases/{tag.removeprefix('_alias.')}.json", 0))
                elif tag.startswith("_repair."):
                    out.append(ObjectInfo(f"{model}/repairs/{tag.removeprefix('_repair.')}.json", 0))
                elif not tag.startswith("_"):
                    out.append(ObjectInfo(f"{model}/versions/{tag}/manifest.json", 0))
        return [o for o in out if o.key.startswith(prefix)]

    def _list_feed(self, alias: str, prefix: str) -> builtins.list[ObjectInfo]:
        """Each model's feed marker for ``alias`` with its digest: one HEAD per model (no cheaper way)."""
        out = []
        for model in self._models():
            key = f"_feed/{alias}/{model}"
            if not key.startswith(prefix):
                continue
            try:
                _, digest = self._manifest(model, "_feed." + alias, f"list {key}", head=True)
            except NotFound:
                continue
            out.append(ObjectInfo(key, 0, digest))
        return out

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        parts = [p for p in prefix.split("/") if p]
        if not parts:
            return self._models()
        if parts[0].startswith("_"):
            return []
        tags = self._tags(parts[0])
        if len(parts) == 1:
            return ["versions"] if tags else []
        if parts[1] == "versions" and len(parts) == 2:
            return sorted(t for t in tags if not t.startswith("_"))
        return []


def _descriptor(value: object) -> bool:
    """Whether ``value`` is a content descriptor this store can use: a sha256 digest and a size."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("digest"), str)
        and value["digest"].startswith("sha256:")
        and isinstance(value.get("size"), int)
        and value["size"] >= 0
        and isinstance(value.get("annotations", {}), dict)
    )


def _layer(manifest: dict[str, Any], file: str) -> dict[str, Any] | None:
    for layer in manifest.get("layers") or []:
        if (layer.get("annotations") or {}).get(TITLE) == file:
            return dict(layer)
    return None


def _read_at_most(response: Any, limit: int, what: str) -> bytes:
    """The body, refused once it passes ``limit`` bytes (a registry may declare one size and send more)."""
    out = bytearray()
    for chunk in response.iter_content(chunk_size=1 << 16):
        out += chunk
        if len(out) > limit:
            raise StoreError(f"{what}: the registry sent more than the {limit} bytes expected")
    return bytes(out)


def _json_list(response: Any, field: str, what: str) -> builtins.list[Any]:
    try:
        body = response.json()
    except ValueError:
        raise StoreError(f"{what}: the registry's answer is not JSON") from None
    value = body.get(field) if isinstance(body, dict) else None
    return value if isinstance(value, list) else []


def _digest_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def _credentials(host: str, settings: Settings) -> tuple[str, str] | None:
    """(user, password) from ``oci_username`` and ``oci_password_file``, else the Docker config."""
    if settings.oci_password_file is not None and not settings.oci_username:
        raise InvalidReference("SERVING_OCI_PASSWORD_FILE needs SERVING_OCI_USERNAME")
    if settings.oci_username:
        if settings.oci_password_file is None:
            raise InvalidReference("SERVING_OCI_USERNAME needs SERVING_OCI_PASSWORD_FILE (a mounted Secret)")
        try:
            password = Path(settings.oci_password_file).read_text().strip()
        except OSError as exc:
            raise InvalidReference(f"cannot read SERVING_OCI_PASSWORD_FILE: {exc.strerror}") from None
        return settings.oci_username, password
    config = settings.oci_docker_config
    explicit = config is not None
    if config is None:
        base = os.environ.get("DOCKER_CONFIG")
        config = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
    try:
        auths = json.loads(Path(config).read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError) as exc:
        if explicit and not isinstance(exc, FileNotFoundError):
            # NOTE: a mounted config that cannot be read must not turn into an anonymous pull
            raise InvalidReference(f"cannot read SERVING_OCI_DOCKER_CONFIG ({type(exc).__name__})") from None
        return None
    for name in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(name) if isinstance(auths, dict) else None
        if isinstance(entry, dict) and entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, TypeError, UnicodeDecodeError):
                raise InvalidReference(
                    f"the Docker config's auth for {host} is not base64 user:password"
                ) from None
            return user, password
    return None
