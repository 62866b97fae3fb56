"""PyTorch: state dicts (+ an importable module class), TorchScript and torch.export.

State dicts load with ``torch.load(weights_only=True)``; the module class named
by ``options["class_path"]`` (``"pkg.mod:Class"``) must be an installed,
importable ``torch.nn.Module`` subclass, built with ``options["init_kwargs"]``.
"""

from __future__ import annotations

import importlib
import math
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import LoadError, UntrustedArtifact
from serving.manifest import Manifest, TensorSpec

from ._common import (
    check_zip_expansion,
    default_inputs,
    pick_inputs,
    primary_file,
    require,
    to_numpy_outputs,
)
from .base import Format, LoadPolicy, Predictor
from .table import FORMAT_FACTS


class TorchPredictor(Predictor):
    """Runs a module under ``torch.inference_mode``; float inputs become float32."""

    def __init__(self, module: Any, inputs: list[TensorSpec], outputs: list[TensorSpec] | None) -> None:
        self.module = module
        self.inputs = inputs
        self.outputs = outputs or [TensorSpec(name="output-0", datatype="FP32", shape=[-1, -1])]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        arrays = pick_inputs(self.inputs, inputs)
        tensors = [
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else None))
            for a in arrays
        ]
        with torch.inference_mode():
            result = self.module(*tensors)
        names = [o.name for o in self.outputs]
        return {k: _float32(v) for k, v in to_numpy_outputs(_detach(result), names).items()}


def _detach(result: Any) -> Any:
    import torch

    if isinstance(result, torch.Tensor):
        return result.detach().cpu().numpy()
    if isinstance(result, dict):
        return {k: _detach(v) for k, v in result.items()}
    if isinstance(result, list | tuple):
        return [_detach(v) for v in result]
    return result


def _float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a


def _zip_names(path: Path) -> list[str]:
    if not path.is_file() or not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as z:
        return z.namelist()


def _is_torchscript(names: list[str]) -> bool:
    return any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names)


def _is_torch_export(names: list[str]) -> bool:
    return any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names)


def _is_torch_zip(names: list[str]) -> bool:
    return any(n.endswith("/data.pkl") for n in names)


def import_module_class(class_path: str) -> type:
    """The ``torch.nn.Module`` subclass named ``"pkg.mod:Class"`` (importable, installed).

    Raises:
        LoadError: it cannot be imported.
        UntrustedArtifact: it is not a ``torch.nn.Module`` subclass.
    """
    import torch

    module_name, sep, qualname = class_path.partition(":")
    if not sep or not module_name or not qualname or "<locals>" in qualname:
        raise LoadError(f"class_path {class_path!r} must look like 'package.module:Class'")
    parts = module_name.split(".")
    if any(p == "__main__" or p.startswith(("test", "_test")) or p == "conftest" for p in parts):
        # NOTE: importing runs the module: a __main__ or test module is a program, not a class.
        raise UntrustedArtifact(
            f"class_path {class_path!r} names a program or test module, not a model class"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise LoadError(f"cannot import module class {class_path!r}: {exc}") from exc
    except SystemExit as exc:
        raise LoadError(f"importing {module_name!r} for class_path tried to exit ({exc.code!r})") from exc
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise UntrustedArtifact(f"class_path {class_path!r} is not a torch.nn.Module subclass")
    return obj


@dataclass(frozen=True)
class ModuleClass:
    """The module a state dict loads into: ``options["class_path"]`` and ``options["init_kwargs"]``.

    Shared by every format that stores only weights (``torch-state-dict``, ``safetensors``).
    """

    cls: type
    init_kwargs: dict[str, Any]

    @classmethod
    def from_options(cls, manifest: Manifest) -> ModuleClass:
        """Check and import the class named in the manifest, before any weight is read.

        Raises:
            LoadError: the options are missing or malformed, or the class cannot be imported.
            UntrustedArtifact: the class is not a ``torch.nn.Module`` subclass.
        """
        class_path = manifest.options.get("class_path")
        if not isinstance(class_path, str):
            raise LoadError(
                f"{manifest.name}:{manifest.version}: a torch state dict needs the "
                f"'class_path' option ('package.module:Class')"
            )
        init_kwargs = manifest.options.get("init_kwargs") or {}
        if not isinstance(init_kwargs, dict):
            raise LoadError("the 'init_kwargs' option must be a JSON object")
        return cls(import_module_class(class_path), init_kwargs)

    def predictor(self, state: Mapping[str, Any], manifest: Manifest) -> TorchPredictor:
        """Build the module, load ``state`` strictly (every key, no extras), serve it.

        Raises:
            UntrustedArtifact: ``init_kwargs`` build a module with far more elements
                than the state dict holds (checked on the meta device, before
                any memory is allocated).
        """
        self.check_size(state, manifest)
        module = self.cls(**self.init_kwargs)
        module.load_state_dict(state, strict=True)
        module.eval()
        return TorchPredictor(module, default_inputs(manifest, "FP32"), manifest.outputs)

    def check_size(self, state: Mapping[str, Any], manifest: Manifest) -> None:
        """Compare what ``init_kwargs`` would allocate with what the state dict holds.

        A 1 KB state dict whose ``init_kwargs`` ask for a 16384x16384 Linear would
        allocate 1 GiB before ``load_state_dict`` noticed the mismatch.
        """
        import torch

        where = f"{manifest.name}:{manifest.version}"
        try:
            with torch.device("meta"):
                shell = self.cls(**self.init_kwargs)
        except Exception as exc:  # NOTE: any failure of installed code, reported
            raise LoadError(f"{where}: cannot build the module with init_kwargs: {exc}") from exc
        check_module_cost(shell, where)
        wanted = sum(t.numel() for t in (*shell.parameters(), *shell.buffers()))
        have = stored_elements(state, where)
        # NOTE: non-persistent buffers are not in the state dict: allow some slack.
        if wanted > max(2 * have, have + _ELEMENT_SLACK):
            raise UntrustedArtifact(
                f"{where}: init_kwargs build a module of {wanted} elements, but the state dict "
                f"holds {have}; refusing to allocate it"
            )


MAX_WINDOW = 4096
"""The most a built-in layer's window or scale may multiply each request's work or size by."""
MAX_OUTPUT_ELEMENTS = 1 << 24
"""The largest fixed output size (``output_size``, ``size``) a built-in layer may ask for."""
_COST_ATTRIBUTES = {
    # attribute: (limit, whether the limit is on the product of its values or on each)
    "kernel_size": (MAX_WINDOW, True),
    "dilation": (MAX_WINDOW, True),
    "scale_factor": (MAX_WINDOW, True),
    "upscale_factor": (MAX_WINDOW, True),
    "padding": (MAX_WINDOW, False),
    "output_padding": (MAX_WINDOW, False),
    "output_size": (MAX_OUTPUT_ELEMENTS, True),
    "size": (MAX_OUTPUT_ELEMENTS, True),
}


def check_module_cost(module: Any, where: str) -> None:
    """Bound what ``init_kwargs`` make each request cost, not only what they allocate.

    ``MaxPool1d(kernel_size=10**6)`` has no weights at all, so the size check passes it,
    and one 6 MB request froze the server. Every ``torch.nn`` layer in the module may
    multiply a request by at most :data:`MAX_WINDOW` through its window, dilation,
    padding or scale, and ask for at most :data:`MAX_OUTPUT_ELEMENTS` by a fixed size.

    Raises:
        UntrustedArtifact: names the layer, the attribute and the limit.
    """
    for name, layer in module.named_modules():
        if not type(layer).__module__.startswith("torch.nn."):
            continue
        for attribute, (limit, product) in _COST_ATTRIBUTES.items():
            numbers = _numbers(getattr(layer, attribute, None))
            if not numbers:
                continue
            if len(numbers) == 1:
                # NOTE: one number stands for every spatial dimension (MaxPool2d(11) is 11x11).
                numbers *= _spatial_dims(type(layer).__name__)
            cost = math.prod(numbers) if product else max(numbers)
            if cost > limit:
                raise UntrustedArtifact(
                    f"{where}: {name or 'the module'} ({type(layer).__name__}) has "
                    f"{attribute}={getattr(layer, attribute)!r}, over the limit of {limit}; "
                    "it sets what each request costs"
                )


def _spatial_dims(class_name: str) -> int:
    """1, 2 or 3 from a layer's name (``Conv2d``, ``MaxPool3d``); 2 when the name does not say."""
    if class_name[-2:-1].isdigit() and class_name.endswith("d"):
        return int(class_name[-2])
    # NOTE: Upsample and the like do not say; images (2) are what they are used on.
    return 2


def _numbers(value: Any) -> list[float]:
    """The magnitudes in an int, float or tuple attribute (at least 1 each); [] for anything else."""
    values = value if isinstance(value, tuple | list) else (value,)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return []
    return [max(abs(float(v)), 1.0) for v in values]


def stored_elements(state: Mapping[str, Any], where: str) -> int:
    """The elements a state dict really stores: unique storage bytes, not what its views claim.

    Raises:
        UntrustedArtifact: a weight is a zero-stride or self-overlapping view (840 bytes
            stored claimed 860 MiB each once a module copied them), or views claim more
            bytes than their storages hold.
    """
    import torch

    storages: dict[tuple[int, int], int] = {}
    claimed = 0
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        shape, strides = tuple(tensor.shape), tuple(tensor.stride())
        if any(s == 0 and n > 1 for n, s in zip(shape, strides, strict=True)):
            raise UntrustedArtifact(
                f"{where}: weight {key!r} is a zero-stride view ({tensor.numel()} elements claimed "
                f"over {tensor.untyped_storage().nbytes()} bytes stored); refusing it"
            )
        if tensor.numel() > 1:
            span = 1 + sum((n - 1) * abs(s) for n, s in zip(shape, strides, strict=True))
            if span < tensor.numel():
                raise UntrustedArtifact(
                    f"{where}: weight {key!r} is a view that overlaps itself; refusing it"
                )
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        claimed += tensor.numel() * tensor.element_size()
    stored = sum(storages.values())
    if claimed > max(2 * stored, stored + (1 << 20)):
        raise UntrustedArtifact(
            f"{where}: the weights claim {claimed} bytes over {stored} bytes stored (overlapping views); "
            "refusing them"
        )
    return sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)) if stored else 0


_ELEMENT_SLACK = 1 << 20


class TorchStateDictFormat(Format, facts=FORMAT_FACTS["torch-state-dict"]):
    """``torch.save(model.state_dict())`` plus the module class in the manifest options."""

    def detect(self, path: Path) -> bool:
        names = _zip_names(path)
        if names:
            return _is_torch_zip(names) and not _is_torchscript(names) and not _is_torch_export(names)
        # NOTE: not .bin, which it loads but which is too generic to claim a file by its name.
        return path.is_file() and path.suffix.lower() in (".pt", ".pth")

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        torch = require("torch", self.extra, self.name)
        module_class = ModuleClass.from_options(manifest)
        path = primary_file(root, manifest, self.suffixes)
        if zipfile.is_zipfile(path):
            check_zip_expansion(path, policy.expansion_limit(path.stat().st_size))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # NOTE: weights_only refuses globals outside torch's tensor allowlist.
            raise UntrustedArtifact(
                f"{path.name} is not a plain state dict (torch weights_only refused it): {exc}"
            ) from exc
        return module_class.predictor(state, manifest)


class TorchScriptFormat(Format, facts=FORMAT_FACTS["torchscript"]):
    """A ``torch.jit.save`` archive."""

    def detect(self, path: Path) -> bool:
        return _is_torchscript(_zip_names(path))

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        torch = require("torch", self.extra, self.name)
        path = primary_file(root, manifest, self.suffixes)
        module = torch.jit.load(str(path), map_location="cpu")
        module.eval()
        return TorchPredictor(module, default_inputs(manifest, "FP32"), manifest.outputs)


class TorchExportFormat(Format, facts=FORMAT_FACTS["torch-export"]):
    """A ``torch.export.save`` program (``.pt2``)."""

    def detect(self, path: Path) -> bool:
        names = _zip_names(path)
        return _is_torch_export(names) or (
            not names and path.is_file() and path.suffix.lower() in self.suffixes
        )

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        torch = require("torch", self.extra, self.name)
        path = primary_file(root, manifest, self.suffixes)
        program = torch.export.load(str(path))
        return TorchPredictor(program.module(), default_inputs(manifest, "FP32"), manifest.outputs)
