"""Import a model from an MLflow registry as a new version of ours.

``serving import mlflow URI`` resolves the URI on the tracking server, downloads the
model directory, reads its ``MLmodel`` file and maps the flavor to one of our formats::

    sklearn (serialization_format pickle)       -> pickle       restricted unpickler
    sklearn (serialization_format skops)        -> skops        skops trusted types
    sklearn (serialization_format cloudpickle)  -> pickle, unrestricted: signed + opt-in only
    onnx                                        -> onnx
    keras / tensorflow (.keras file)            -> keras        safe mode
    keras / tensorflow (.h5, SavedModel)        -> keras-h5 / savedmodel: signed + opt-in only
    pytorch (export_model, .pt2)                -> torch-export: signed + opt-in only
    python_function only (mlflow.pyfunc.model)  -> pickle, unrestricted: signed + opt-in only

"Opt-in" is the rule for every format that runs code on load (SECURITY.md): the
model is listed in ``SERVING_UNRESTRICTED_MODELS`` and the version is signed
(``--signing-key``); otherwise the import is refused before anything is published.
The whole MLflow model directory is published (``options.file`` names the model
file), with the MLflow source in ``metadata["mlflow"]``: the URI, registered model,
version, alias, run id, logged-model id and the run's metrics.

:func:`sync_once` is one poll of ``--sync``: it re-imports when the MLflow alias
has moved since the last import; :func:`sync` loops it until ``max_polls`` or a stop.

Example:
    >>> registry = MlflowRegistry("http://127.0.0.1:5000")  # doctest: +SKIP
    >>> imported = import_model(registry, repo, "models:/iris@champion", settings=settings)  # doctest: +SKIP
    >>> imported.manifest.version, imported.source.model_version  # doctest: +SKIP
    ('1', '3')
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

from serving.errors import (
    AliasNotFound,
    InvalidReference,
    InvalidRequest,
    MissingExtra,
    ModelNotFound,
    NotFound,
    ServingError,
    StoreError,
    StoreUnavailable,
    UnknownFormat,
    UntrustedArtifact,
    VersionNotFound,
)
from serving.formats.table import FORMAT_FACTS
from serving.manifest import Manifest, check_name

if TYPE_CHECKING:
    from serving.encoding import EncodeOptions
    from serving.repository import Repository
    from serving.settings import Settings
    from serving.signing import SigningKey

__all__ = [
    "Imported",
    "MlflowRef",
    "MlflowRegistry",
    "MlflowSource",
    "Plan",
    "import_model",
    "plan_import",
    "sync",
    "sync_once",
]

log = logging.getLogger(__name__)

_MODELS_ALIAS = re.compile(r"^models:/(?P<model>[^/@]+)@(?P<alias>[^/@]+)$")
_MODELS_VERSION = re.compile(r"^models:/(?P<model>[^/@]+)/(?P<version>[0-9]+)$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9a-zA-Z_-]+)/(?P<path>[^?#]+?)/?$")


@dataclass(frozen=True)
class MlflowRef:
    """A parsed MLflow model URI: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
    ``runs:/RUN_ID/PATH``."""

    uri: str
    kind: Literal["alias", "version", "run"]
    model: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    path: str | None = None

    @classmethod
    def parse(cls, uri: str) -> MlflowRef:
        """Parse ``uri``.

        Raises:
            InvalidReference: it is none of the three forms.
        """
        if m := _MODELS_ALIAS.fullmatch(uri):
            return cls(uri, "alias", model=m["model"], alias=m["alias"])
        if m := _MODELS_VERSION.fullmatch(uri):
            return cls(uri, "version", model=m["model"], version=m["version"])
        if m := _RUNS.fullmatch(uri):
            path = m["path"]
            if ".." in path.split("/"):
                raise InvalidReference(f"MLflow URI {uri!r}: the artifact path may not contain '..'")
            return cls(uri, "run", run_id=m["run"], path=path)
        raise InvalidReference(
            f"MLflow URI {uri!r} is not models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH"
        )


@dataclass(frozen=True)
class MlflowSource:
    """What a :class:`MlflowRef` points at now on the tracking server."""

    ref: MlflowRef
    download_uri: str
    """A URI that keeps pointing at this exact model (``models:/NAME/VERSION`` or ``runs:/``)."""
    model_version: str | None
    run_id: str | None
    model_id: str | None

    @property
    def key(self) -> str:
        """Identity of the MLflow model: equal keys mean the same artifacts."""
        if self.ref.model is not None:
            return f"{self.ref.model}/{self.model_version}"
        return self.download_uri


@dataclass(frozen=True)
class Plan:
    """How an MLflow model directory maps onto one of our formats."""

    flavor: str
    format: str
    options: dict[str, Any]
    unrestricted: bool
    """The format runs code on load: the signed + opt-in rules apply."""
    why: str
    """What makes it unrestricted, for the refusal message."""
    detail: dict[str, Any]


@dataclass(frozen=True)
class Imported:
    """An MLflow model published as ``manifest``."""

    manifest: Manifest
    source: MlflowSource
    plan: Plan
    seconds: float


def _public_uri(uri: str) -> str:
    """``uri`` without user:password, so credentials never reach a manifest."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class MlflowRegistry:
    """The tracking server behind ``tracking_uri``, through the ``mlflow`` client.

    Every client failure is translated at this boundary: a missing model, version,
    alias or run is :class:`~serving.errors.NotFound`; an unreachable server is
    :class:`~serving.errors.StoreUnavailable`; anything else :class:`~serving.errors.StoreError`.
    """

    def __init__(self, tracking_uri: str) -> None:
        if not tracking_uri:
            raise InvalidRequest("no MLflow tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
        try:
            from mlflow import MlflowClient
        except ModuleNotFoundError as exc:
            raise MissingExtra(
                "importing from MLflow needs the mlflow client: pip install 'serving[mlflow]'"
            ) from exc
        self.tracking_uri = tracking_uri
        self.public_uri = _public_uri(tracking_uri)
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _call(self, what: str, fn: Callable[[], Any], missing: type[NotFound] = NotFound) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except MlflowException as exc:
            code = str(getattr(exc, "error_code", ""))
            text = " ".join(str(exc.message if hasattr(exc, "message") else exc).split())
            if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in text.lower():
                raise missing(f"{what}: not found on {self.public_uri}") from exc
            if "max retries" in text.lower() or "connection" in text.lower():
                raise StoreUnavailable(f"{what}: MLflow at {self.public_uri} is unreachable") from exc
            raise StoreError(f"{what}: MLflow at {self.public_uri} failed: {text[:300]}") from exc
        except OSError as exc:
            raise StoreUnavailable(f"{what}: MLflow at {self.public_uri} is unreachable: {exc}") from exc

    def resolve(self, ref: MlflowRef) -> MlflowSource:
        """Ask the server which model ``ref`` points at now."""
        if ref.kind == "run":
            run_id = str(ref.run_id)
            run = self._call(f"run {run_id}", lambda: self._client.get_run(run_id))
            return MlflowSource(ref, ref.uri, None, run.info.run_id, None)
        model = str(ref.model)
        if ref.kind == "alias":
            alias = str(ref.alias)
            mv = self._call(
                f"models:/{model}@{alias}",
                lambda: self._client.get_model_version_by_alias(model, alias),
                AliasNotFound,
            )
        else:
            number = str(ref.version)
            mv = self._call(
                f"models:/{model}/{number}",
                lambda: self._client.get_model_version(model, number),
                VersionNotFound,
            )
        source = str(mv.source or "")
        model_id = getattr(mv, "model_id", None) or (
            source.removeprefix("models:/") if source.startswith("models:/m-") else None
        )
        return MlflowSource(ref, f"models:/{ref.model}/{mv.version}", str(mv.version), mv.run_id, model_id)

    def metrics(self, run_id: str | None) -> dict[str, float]:
        """The run's latest metrics (empty without a run)."""
        if not run_id:
            return {}
        run = self._call(f"run {run_id}", lambda: self._client.get_run(run_id))
        return {k: float(v) for k, v in sorted(run.data.metrics.items())}

    def download(self, source: MlflowSource, dst: Path) -> Path:
        """Download the model directory of ``source`` into ``dst``; returns its path."""
        import mlflow.artifacts

        ref = source.ref
        if ref.kind == "run":
            run_id, path = str(source.run_id), str(ref.path)

            def fetch() -> Any:
                return mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=self.tracking_uri
                )
        else:
            model, number = str(ref.model), str(source.model_version)
            # NOTE: the version's own artifact URI, not models:/..., which MLflow would
            # resolve through its process-wide registry URI rather than this server.
            artifact_uri = self._call(
                source.download_uri,
                lambda: self._client.get_model_version_download_uri(model, number),
                VersionNotFound,
            )

            def fetch() -> Any:
                return mlflow.artifacts.download_artifacts(
                    artifact_uri=str(artifact_uri), dst_path=str(dst), tracking_uri=self.tracking_uri
                )

        return Path(self._call(source.download_uri, fetch))


def _within(root: Path, rel: str, what: str) -> str:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()) or not path.exists():
        raise UnknownFormat(f"MLmodel names {what} {rel!r}, which is not in the model directory")
    return path.relative_to(root.resolve()).as_posix()


def _find(root: Path, pattern: str) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(pattern) if p.is_file())


def _find_format(root: Path, fmt: str) -> list[str]:
    """The files below ``root`` with one of the extensions of our format ``fmt``."""
    return sorted({f for suffix in FORMAT_FACTS[fmt].suffixes for f in _find(root, f"*{suffix}")})


MAX_MLMODEL_BYTES = 1024**2
"""An ``MLmodel`` file is a few hundred bytes; past this it is refused unread."""
_TEXT_FIELDS = ("mlflow_version", "model_uuid", "utc_time_created", "run_id", "artifact_path")
_FLAVOR_TEXT = (
    "serialization_format",
    "pickled_model",
    "sklearn_version",
    "data",
    "loader_module",
    "python_model",
    "keras_version",
    "pytorch_version",
    "onnx_version",
)


class _NoAliases(yaml.SafeLoader):
    """YAML without aliases: an anchor repeated by ``*alias`` nests for free, and a 1.2 KB
    ``MLmodel`` expanded to a 374 MB manifest."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted", mark)
        return super().compose_node(parent, index)


def read_mlmodel(path: Path) -> dict[str, Any]:
    """``MLmodel`` as a mapping, with the fields the import reads checked for type and size.

    Raises:
        UnknownFormat: unreadable, too large, YAML aliases, or a field of the wrong type.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_MLMODEL_BYTES + 1)
    except OSError as exc:
        raise UnknownFormat(f"not an MLflow model directory: cannot read {path.name}: {exc}") from exc
    if len(data) > MAX_MLMODEL_BYTES:
        raise UnknownFormat(f"{path.name} is over {MAX_MLMODEL_BYTES} bytes; refusing to parse it")
    try:
        spec = yaml.load(data, Loader=_NoAliases)  # noqa: S506 -- NOTE: a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UnknownFormat(f"cannot read {path.name}: {str(exc)[:300]}") from exc
    if not isinstance(spec, dict):
        raise UnknownFormat(f"{path.name} is not a YAML mapping")
    for key in _TEXT_FIELDS:
        _check_text(spec.get(key), key, path.name)
    flavors = spec.get("flavors")
    if flavors is not None and not (isinstance(flavors, dict) and all(isinstance(k, str) for k in flavors)):
        raise UnknownFormat(f"{path.name}: 'flavors' must be a mapping of names")
    for flavor_name, flavor in (flavors or {}).items():
        if not isinstance(flavor, dict):
            raise UnknownFormat(f"{path.name}: flavor {flavor_name[:40]!r} must be a mapping")
        for key in _FLAVOR_TEXT:
            _check_text(flavor.get(key), f"flavors.{flavor_name[:40]}.{key}", path.name)
    return spec


def _check_text(value: Any, field: str, where: str, limit: int = 1024) -> None:
    if value is None:
        return
    if not isinstance(value, str | int | float) or isinstance(value, bool) or len(str(value)) > limit:
        raise UnknownFormat(f"{where}: {field} must be a string of at most {limit} characters")


def plan_import(model_dir: Path) -> Plan:
    """Read ``model_dir/MLmodel`` and decide which format of ours it becomes.

    Raises:
        UnknownFormat: no MLmodel file, or a flavor serving has no loader for.
    """
    spec = read_mlmodel(model_dir / "MLmodel")
    flavors: dict[str, Any] = spec.get("flavors") or {}
    detail = {"mlflow_version": spec.get("mlflow_version"), "flavors": sorted(flavors)}

    if "sklearn" in flavors:
        sk = flavors["sklearn"]
        # NOTE: MLflow's default before 3.x was cloudpickle; a missing field means that.
        fmt = str(sk.get("serialization_format") or "cloudpickle")
        file = _within(model_dir, str(sk.get("pickled_model", "model.pkl")), "pickled_model")
        detail = {**detail, "serialization_format": fmt, "sklearn_version": sk.get("sklearn_version")}
        if fmt == "pickle":
            return Plan("sklearn", "pickle", {"file": file}, False, "", detail)
        if fmt == "skops":
            return Plan("sklearn", "skops", {"file": file}, False, "", detail)
        if fmt == "cloudpickle":
            why = "a cloudpickle sklearn model (serialization_format: cloudpickle), which runs code on load"
            return Plan("sklearn", "pickle", {"file": file, "unrestricted": True}, True, why, detail)
        raise UnknownFormat(f"MLflow sklearn model with unknown serialization_format {fmt!r}")
    if "onnx" in flavors:
        file = _within(model_dir, str(flavors["onnx"].get("data", "model.onnx")), "onnx data")
        return Plan("onnx", "onnx", {"file": file}, False, "", detail)
    for flavor in ("keras", "tensorflow"):
        if flavor not in flavors:
            continue
        if keras := _find_format(model_dir, "keras"):
            return Plan(flavor, "keras", {"file": keras[0]}, False, "", detail)
        # NOTE: MLflow's keras flavor writes .h5, never .hdf5 (which keras-h5 also loads).
        if h5 := _find(model_dir, "*.h5"):
            why = "a legacy Keras .h5 model, which runs Lambda layers when loaded"
            return Plan(flavor, "keras-h5", {"file": h5[0]}, True, why, detail)
        if graphs := _find(model_dir, "saved_model.pb"):
            sub = str(Path(graphs[0]).parent.as_posix())
            why = "a TensorFlow SavedModel, whose graph can call file and process ops"
            return Plan(flavor, "savedmodel", {"dir": sub}, True, why, detail)
        raise UnknownFormat(f"MLflow {flavor} model without a .keras, .h5 or SavedModel file")
    if "pytorch" in flavors:
        if exported := _find_format(model_dir, "torch-export"):
            why = "a torch.export program, whose loader is not hardened against hostile input"
            return Plan("pytorch", "torch-export", {"file": exported[0]}, True, why, detail)
        raise UnknownFormat(
            "MLflow pytorch model saved as a pickled nn.Module (torch.save with cloudpickle): serving "
            "has no loader that runs such pickles; log it with mlflow.pytorch.log_model(..., "
            "export_model=True) or publish a state dict with serving publish"
        )
    pyfunc = flavors.get("python_function") or {}
    if pyfunc.get("loader_module") == "mlflow.pyfunc.model":
        artifacts = pyfunc.get("python_model", "python_model.pkl")
        file = _within(model_dir, str(artifacts), "python_model")
        why = "a custom pyfunc (mlflow.pyfunc.PythonModel) that only cloudpickle can load, which runs code"
        return Plan("python_function", "pickle", {"file": file, "unrestricted": True}, True, why, detail)
    raise UnknownFormat(
        f"MLflow model with flavors {sorted(flavors)}: serving maps sklearn, onnx, keras/tensorflow "
        "and pytorch (torch.export)"
    )


def _check_opt_in(plan: Plan, name: str, where: str, settings: Settings, signed: bool) -> None:
    """The unrestricted-format rules (SECURITY.md): listed model and a signed version."""
    if not plan.unrestricted:
        return
    missing = []
    if name not in settings.unrestricted_models:
        missing.append(f"add {name!r} to SERVING_UNRESTRICTED_MODELS")
    if not signed:
        missing.append("sign the version with --signing-key")
    if missing:
        raise UntrustedArtifact(
            f"{where} is {plan.why}; refused: it is imported only as a signed version of a model the "
            f"operator opted in ({' and '.join(missing)})"
        )


def import_model(
    registry: MlflowRegistry,
    repo: Repository,
    uri: str | MlflowRef,
    *,
    settings: Settings,
    name: str | None = None,
    version: str | None = None,
    alias: str | None = None,
    signing_key: SigningKey | None = None,
    encode: EncodeOptions | None = None,
    source: MlflowSource | None = None,
) -> Imported:
    """Resolve ``uri``, download the model and publish it as a new version of ``name``.

    Args:
        name: our model name; defaults to the registered model's name (required for runs:/).
        version: our version; defaults to the next integer.
        alias: move this alias of ours to the new version.
        source: an already resolved source (``sync_once`` passes the one it compared).

    Raises:
        InvalidReference: a malformed URI. NotFound: no such model, version, alias or run.
        UnknownFormat: a flavor we cannot map. UntrustedArtifact: an unrestricted format
        without the operator's opt-in and a signature. StoreUnavailable: MLflow is unreachable.
    """
    from serving.publish import publish_path

    started = time.perf_counter()
    ref = uri if isinstance(uri, MlflowRef) else MlflowRef.parse(uri)
    name = name or ref.model
    if not name:
        raise InvalidRequest(f"{ref.uri}: a runs:/ URI names no model: pass --name")
    check_name(name, "model name")
    source = source or registry.resolve(ref)
    with tempfile.TemporaryDirectory(prefix="serving-mlflow-") as tmp:
        model_dir = registry.download(source, Path(tmp) / "model")
        plan = plan_import(model_dir)
        _check_opt_in(plan, name, ref.uri, settings, signing_key is not None)
        metadata = {
            "mlflow": {
                "tracking_uri": registry.public_uri,
                "uri": ref.uri,
                "source": source.download_uri,
                "registered_model": ref.model,
                "model_version": source.model_version,
                "alias": ref.alias,
                "run_id": source.run_id,
                "model_id": source.model_id,
                "metrics": registry.metrics(source.run_id),
                "flavor": plan.flavor,
                **{k: v for k, v in plan.detail.items() if v is not None},
            }
        }
        manifest = publish_path(
            repo,
            model_dir,
            name,
            version=version,
            format=plan.format,
            alias=alias,
            options=plan.options,
            metadata=metadata,
            signing_key=signing_key,
            encode=encode,
        )
    return Imported(manifest, source, plan, time.perf_counter() - started)


def sync_once(
    registry: MlflowRegistry,
    repo: Repository,
    ref: MlflowRef,
    last_key: str | None,
    **kwargs: Any,
) -> tuple[str, Imported | None]:
    """One poll of ``--sync``: import when ``ref`` points elsewhere than ``last_key``.

    Returns the key now current and what was imported (None when unchanged).
    ``kwargs`` go to :func:`import_model`.
    """
    source = registry.resolve(ref)
    if source.key == last_key:
        return source.key, None
    return source.key, import_model(registry, repo, ref, source=source, **kwargs)


def last_imported_key(repo: Repository, name: str) -> str | None:
    """The MLflow key of the newest version of ``name`` imported from MLflow, so a
    restarted ``--sync`` does not import the same MLflow version again."""
    for version in reversed(repo.list_versions(name)):
        try:
            manifest, _ = repo.manifest(name, version)
        except NotFound:
            continue
        mlflow = manifest.metadata.get("mlflow")
        if isinstance(mlflow, dict) and mlflow.get("registered_model") and mlflow.get("model_version"):
            return f"{mlflow['registered_model']}/{mlflow['model_version']}"
    return None


def sync(
    registry: MlflowRegistry,
    repo: Repository,
    ref: MlflowRef,
    *,
    interval_s: float,
    stop: threading.Event,
    max_polls: int | None = None,
    on_poll: Callable[[str, Imported | None], None] | None = None,
    **kwargs: Any,
) -> int:
    """Follow an MLflow alias: poll every ``interval_s`` until ``stop`` is set or
    ``max_polls`` polls ran; returns how many versions were imported.

    A failed poll (server down, a refused flavor) is logged and retried at the next
    interval; the alias of ours stays where it was.
    """
    if ref.kind != "alias":
        raise InvalidRequest(f"--sync follows an MLflow alias: {ref.uri} is not models:/NAME@ALIAS")
    name = kwargs.get("name") or ref.model
    assert name is not None  # NOTE: an alias ref always names its model
    try:
        last = last_imported_key(repo, name)
    except ModelNotFound:
        last = None
    imported = polls = 0
    while not stop.is_set() and (max_polls is None or polls < max_polls):
        polls += 1
        try:
            last, done = sync_once(registry, repo, ref, last, **kwargs)
        except ServingError as exc:
            log.warning("sync %s: %s", ref.uri, exc)
            if on_poll is not None:
                on_poll(f"error: {exc}", None)
        else:
            imported += done is not None
            if on_poll is not None:
                on_poll(last, done)
        if max_polls is not None and polls >= max_polls:
            break
        stop.wait(interval_s)
    return imported
