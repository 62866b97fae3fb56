"""``safetensors``: a torch module's weights as a ``.safetensors`` file.

The file is a little-endian u64 header length, a JSON header (dtype, shape and
byte offsets per tensor) and the raw tensor bytes: there is nothing in it that
could name a callable. The module class comes from the manifest options exactly
as for ``torch-state-dict`` (:class:`serving.formats.pytorch.ModuleClass`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from serving.manifest import Manifest

from ._common import primary_file, require
from .base import Format, LoadPolicy, Predictor
from .pytorch import ModuleClass
from .table import FORMAT_FACTS

# NOTE: the safetensors library refuses headers above 100 MB; detection reads no more.
_MAX_HEADER = 100 * 1024 * 1024


def _has_safetensors_header(path: Path) -> bool:
    """Whether ``path`` starts with a header length that fits the file and a JSON header of tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= min(_MAX_HEADER, path.stat().st_size - 8):
            return False
        raw = f.read(length)
    if not raw.startswith(b"{"):
        return False
    try:
        header = json.loads(raw)
    except ValueError:
        return False
    return isinstance(header, dict) and all(
        isinstance(v, dict) and "dtype" in v and "data_offsets" in v
        for k, v in header.items()
        if k != "__metadata__"
    )


class SafetensorsFormat(Format, facts=FORMAT_FACTS["safetensors"]):
    """``safetensors.torch.save_file(model.state_dict())`` plus the module class in the options."""

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        return path.suffix.lower() in self.suffixes or _has_safetensors_header(path)

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        st = require("safetensors.torch", self.extra, self.name)
        module_class = ModuleClass.from_options(manifest)
        path = primary_file(root, manifest, self.suffixes)
        state = st.load_file(str(path), device="cpu")
        return module_class.predictor(state, manifest)
