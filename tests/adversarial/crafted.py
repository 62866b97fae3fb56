"""Crafted versions a publisher can write with nothing but the frameworks' own tools.

Each builder writes one artifact (every class in it is one a model may hold) and
returns ``(path, format, publish kwargs)``. Unchecked, each one crashed, hung, read
the heap of, or blew up the memory of the process that served it (issue 20).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np

Case = tuple[Path, str, dict[str, Any]]
ROW4 = [[0.5, 0.5, 0.5, 0.5]]


def _kd_tree(work: Path, name: str, seed: int, change: Callable[[list[Any]], None]) -> Case:
    """A fitted KNeighborsClassifier whose KD-tree state ``change`` edited (the list of
    ``__getstate__``: [1] is ``idx_array``, [2] ``node_data``), joblib-dumped as ``name``."""
    from sklearn.neighbors import KNeighborsClassifier

    x = np.random.default_rng(seed).normal(size=(64, 4))
    model = KNeighborsClassifier(n_neighbors=3, algorithm="kd_tree", leaf_size=4).fit(
        x, np.repeat([0, 1], 32)
    )
    state = list(model._tree.__getstate__())
    change(state)
    model._tree.__setstate__(tuple(state))
    path = work / name
    joblib.dump(model, path)
    return path, "sklearn", {"example": ROW4}


def kd_tree_bad_leaf(work: Path) -> Case:
    """Out-of-range indices only in the last leaf, which the example row never reaches:
    the isolation probe and warm-up pass, and a request that reaches the leaf crashes."""

    def change(state: list[Any]) -> None:
        idx, last = state[1].copy(), state[2][-1]
        idx[int(last["idx_start"]) : int(last["idx_end"])] = 10**12
        state[1] = idx

    return _kd_tree(work, "kd-leaf.joblib", 0, change)


def kd_tree_bad_node_range(work: Path) -> Case:
    """A case of our own: the indices are fine, a leaf's idx_end is past them."""

    def change(state: list[Any]) -> None:
        state[2] = state[2].copy()
        state[2]["idx_end"][-1] = 10**9

    return _kd_tree(work, "kd-range.joblib", 1, change)


def kd_tree_inner_node_without_children(work: Path) -> Case:
    """A case of our own: the last node says it is not a leaf, so a query descends
    to children 2i+1 and 2i+2 past the node array."""

    def change(state: list[Any]) -> None:
        state[2] = state[2].copy()
        state[2]["is_leaf"][-1] = 0

    return _kd_tree(work, "kd-inner.joblib", 2, change)


def sparse_coef_heap_read(work: Path) -> Case:
    """A linear model whose ``coef_`` is a CSR matrix with out-of-range column indices:
    each predict gathers from past the end of the input row, i.e. from the heap."""
    from scipy import sparse
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=300).fit(x, y)
    coef = sparse.csr_matrix(model.coef_)
    coef.indices = (coef.indices + 50_000).astype(coef.indices.dtype)
    model.coef_ = coef
    path = work / "sparse.joblib"
    joblib.dump(model, path)
    return path, "sklearn", {}


def sparse_indptr_past_data(work: Path) -> Case:
    """A case of our own: the indices are in range, ``indptr`` runs past ``data``."""
    from scipy import sparse
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=300).fit(x, y)
    coef = sparse.csr_matrix(model.coef_)
    coef.indptr = coef.indptr.copy()
    coef.indptr[-1] = 10**6
    model.coef_ = coef
    path = work / "indptr.joblib"
    joblib.dump(model, path)
    return path, "sklearn", {}


def _text_pipeline(**vectorizer: Any) -> Any:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(CountVectorizer(), LogisticRegression(max_iter=200))
    pipe.fit(["good movie", "bad movie", "great film", "awful film"], [1, 0, 1, 0])
    pipe[0].set_params(**vectorizer)
    return pipe


def vectorizer_ngram_bomb(work: Path) -> Case:
    """``ngram_range=(1, 10**6)``: a 2.5 KB request took 2.6 GB and 9.5 s."""
    path = work / "ngram.joblib"
    joblib.dump(_text_pipeline(ngram_range=(1, 10**6)), path)
    return path, "sklearn", {}


def vectorizer_char_ngram_bomb(work: Path) -> Case:
    """A case of our own: the same through character n-grams."""
    path = work / "char-ngram.joblib"
    joblib.dump(_text_pipeline(analyzer="char", ngram_range=(1, 4096)), path)
    return path, "sklearn", {}


def torch_zero_stride_weights(work: Path) -> Case:
    """An 840-byte-class file: one stored float expanded to a 4096x4096 weight with strides
    (0, 0); the old size check counted its elements as stored, and loading it into the
    module held the full size."""
    import torch

    weight = torch.zeros(1).expand(4096, 4096)
    path = work / "stride0.pt"
    torch.save({"weight": weight, "bias": torch.zeros(1).expand(4096)}, path)
    options = {"class_path": "torch.nn:Linear", "init_kwargs": {"in_features": 4096, "out_features": 4096}}
    return path, "torch-state-dict", {"options": options}


def torch_overlapping_weights(work: Path) -> Case:
    """A case of our own: strides (1, 1), each row one element on from the last, so 4096x4096
    elements overlap in 8191 stored floats (no stride is zero)."""
    import torch

    base = torch.zeros(2 * 4096 - 1)
    weight = base.as_strided((4096, 4096), (1, 1))
    path = work / "overlap.pt"
    torch.save({"weight": weight, "bias": torch.zeros(4096)}, path)
    options = {"class_path": "torch.nn:Linear", "init_kwargs": {"in_features": 4096, "out_features": 4096}}
    return path, "torch-state-dict", {"options": options}


# -- Keras: archives written by hand (json + h5py), as a publisher can, without Keras ---------------


def _keras_object(module: str, class_name: str, config: Any, **extra: Any) -> dict[str, Any]:
    return {"module": module, "class_name": class_name, "config": config, "registered_name": None, **extra}


def _keras_function(module: str, name: str) -> dict[str, Any]:
    return {"module": module, "class_name": "function", "config": name, "registered_name": "function"}


def _keras_archive(
    work: Path,
    name: str,
    extra_layers: list[dict[str, Any]] = (),  # type: ignore[assignment]
    weights: Callable[[Any], None] | None = None,
) -> Case:
    """A ``.keras`` archive of Sequential(Input(4), Dense(3), *extra_layers); ``weights``
    writes ``model.weights.h5`` into the h5py file it is given (default: the honest Dense)."""
    import io
    import json
    import zipfile

    import h5py

    dense = _keras_object(
        "keras.layers",
        "Dense",
        {"name": "dense", "units": 3, "activation": "linear", "use_bias": True, "dtype": "float32"},
        build_config={"input_shape": [None, 4]},
    )
    layers = [_keras_object("keras.layers", "InputLayer", {"batch_shape": [None, 4], "name": "in"}), dense]
    config = _keras_object("keras", "Sequential", {"name": "seq", "layers": [*layers, *extra_layers]})

    def honest(f: Any) -> None:
        f["layers/dense/vars/0"] = np.ones((4, 3), np.float32)
        f["layers/dense/vars/1"] = np.zeros(3, np.float32)
        f.create_group("vars")

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        (weights or honest)(f)
    path = work / name
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        z.writestr("config.json", json.dumps(config))
        z.writestr("model.weights.h5", buffer.getvalue())
    return path, "keras", {}


def _lambda(function: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
    return _keras_object(
        "keras.layers", "Lambda", {"name": "l", "function": function, "arguments": arguments}
    )


def keras_lambda_zeros(work: Path) -> Case:
    """A Lambda over ``keras.ops.zeros`` with a literal shape: 26 bytes of request took the
    server from 658 to 2,629 MiB. Keras safe mode admits it (no bytecode)."""
    return _keras_archive(
        work, "zeros.keras", [_lambda(_keras_function("keras.ops", "zeros"), {"shape": [2**29]})]
    )


def keras_lambda_application(work: Path) -> Case:
    """A Lambda over a ``keras.applications`` constructor: loading it downloaded weights."""
    return _keras_archive(
        work,
        "app.keras",
        [_lambda(_keras_function("keras.applications", "ResNet50"), {"weights": "imagenet"})],
    )


def keras_lambda_set_epsilon(work: Path) -> Case:
    """A Lambda over ``keras.config.set_epsilon``: it changed another Keras model's answers."""
    return _keras_archive(
        work, "epsilon.keras", [_lambda(_keras_function("keras.config", "set_epsilon"), {"value": 1.0})]
    )


def keras_zero_fill_weights(work: Path) -> Case:
    """HDF5 weights declared at full shape with nothing stored read back as zeros: 20 KB of
    file held 1.7 GB. Here a chunked (4, 2**27) dataset with no chunk written."""

    def weights(f: Any) -> None:
        f.create_dataset("layers/dense/vars/0", shape=(4, 2**27), dtype="f4", chunks=(4, 1024))
        f["layers/dense/vars/1"] = np.zeros(3, np.float32)

    return _keras_archive(work, "zero-fill.keras", weights=weights)


def keras_lambda_inside_a_wrapper(work: Path) -> Case:
    """A case of our own: the Lambda is not a layer of the model but the layer a
    ``TimeDistributed`` wraps, one level down in its config."""
    inner = _lambda(_keras_function("keras.ops", "zeros"), {"shape": [2**29]})
    return _keras_archive(
        work,
        "wrapped.keras",
        [_keras_object("keras.layers", "TimeDistributed", {"name": "t", "layer": inner})],
    )


def keras_savedmodel_layer(work: Path) -> Case:
    """A case of our own: ``TFSMLayer``, a built-in layer that loads a SavedModel (a program)
    from whatever path its config names."""
    return _keras_archive(
        work, "tfsm.keras", [_keras_object("keras.layers", "TFSMLayer", {"name": "t", "filepath": "/tmp/x"})]
    )


def keras_registered_custom_layer(work: Path) -> Case:
    """A case of our own: a built-in class name under a registered custom name, which Keras
    resolves through its registry before the module."""
    layer = _keras_object("keras.layers", "Dense", {"name": "d", "units": 3})
    layer["registered_name"] = "evil>Dense"
    return _keras_archive(work, "registered.keras", [layer])


def keras_repeat_bomb(work: Path) -> Case:
    """A case of our own: no Lambda, a built-in ``RepeatVector`` with n = 10**9: each row of
    each request becomes a billion."""
    return _keras_archive(
        work, "repeat.keras", [_keras_object("keras.layers", "RepeatVector", {"name": "r", "n": 10**9})]
    )


def keras_external_weights(work: Path) -> Case:
    """A case of our own: a weight stored in another file (HDF5 external storage), which
    would read a server file into the model."""

    def weights(f: Any) -> None:
        f.create_dataset("layers/dense/vars/0", shape=(4, 3), dtype="f4", external=[("/etc/hostname", 0, 48)])
        f["layers/dense/vars/1"] = np.zeros(3, np.float32)

    return _keras_archive(work, "external.keras", weights=weights)


def keras_linked_weights(work: Path) -> Case:
    """A case of our own: a weight that is a soft link, and a group hard-linked into itself."""

    def weights(f: Any) -> None:
        f["layers/dense/vars/1"] = np.zeros(3, np.float32)
        f["layers/dense/vars/0"] = f["layers/dense/vars/1"]  # the same dataset twice
        f["layers/dense/loop"] = f["layers/dense"]

    return _keras_archive(work, "linked.keras", weights=weights)


# -- ONNX: valid graphs, a few hundred bytes ----------------------------------------------------


def _onnx(work: Path, name: str, nodes: list[Any], initializers: list[Any] = ()) -> Case:  # type: ignore[assignment]
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
        initializer=list(initializers),
    )
    path = work / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, "onnx", {"example": [[0.25, 0.25, 0.25, 0.25]]}


def onnx_constant_fold_bomb(work: Path) -> Case:
    """About 200 bytes that constant-fold, when the session is created, to a tensor just under
    onnxruntime's 1 GiB folding limit: the serving process went from 231 to 2,279 MiB."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([2**28 - 1024], np.int64), "shape")
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=fill),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["X", "total"], ["Y"]),
    ]
    return _onnx(work, "fold-bomb", nodes, [shape])


def onnx_request_controlled_loop(work: Path) -> Case:
    """A ``Loop`` whose trip count is the sum of the request's row: the example runs it once,
    a request with a large number runs it for ever."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["v"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [None, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [None, 4]),
        ],
    )
    nodes = [
        helper.make_node("ReduceSum", ["X"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["trips"], to=TensorProto.INT64),
        helper.make_node(
            "Constant", [], ["true"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])
        ),
        helper.make_node("Loop", ["trips", "true", "X"], ["Y"], body=body),
    ]
    return _onnx(work, "loop", nodes)


def _weightless(work: Path, name: str, class_path: str, init_kwargs: dict[str, Any]) -> Case:
    import torch

    path = work / f"{name}.pt"
    torch.save({}, path)
    return path, "torch-state-dict", {"options": {"class_path": class_path, "init_kwargs": init_kwargs}}


def torch_weightless_pool(work: Path) -> Case:
    """A state dict with no weights at all, for ``MaxPool1d(kernel_size=10**6, stride=1)``:
    the size check passed it, and one 6 MB request froze the server."""
    return _weightless(work, "pool", "torch.nn:MaxPool1d", {"kernel_size": 10**6, "stride": 1})


def torch_weightless_upsample(work: Path) -> Case:
    """A case of our own: no window at all, ``Upsample(scale_factor=128)`` makes each request's
    image 16,384 times larger."""
    return _weightless(work, "upsample", "torch.nn:Upsample", {"scale_factor": 128})


def keras_category_encoding_bomb(work: Path) -> Case:
    """Found by a reviewer who did not see the guard: no Lambda, a built-in ``CategoryEncoding``
    400 million tokens wide; one (1, 4) request took 2.2 GB."""
    layer = _keras_object(
        "keras.layers",
        "CategoryEncoding",
        {"name": "c", "num_tokens": 400_000_000, "output_mode": "multi_hot"},
    )
    return _keras_archive(work, "catenc.keras", [layer])


def keras_upsampling_chain(work: Path) -> Case:
    """Found by the same reviewer: three ``UpSampling1D`` layers, each under the per-layer
    limit, together 134 million times each request."""
    layers = [_keras_object("keras.layers", "Reshape", {"name": "r", "target_shape": [3, 1]})]
    layers += [
        _keras_object("keras.layers", "UpSampling1D", {"name": f"u{i}", "size": size})
        for i, size in enumerate((4096, 4096, 8))
    ]
    return _keras_archive(work, "upchain.keras", layers)


def keras_training_call_with_a_string_array(work: Path) -> Case:
    """Found by the same reviewer: a layer called with ``training=`` a literal array of dtype
    ``U400000000`` (a 1.6 GB array from a few bytes of config), which also turned Dropout on."""
    dropout = _keras_object("keras.layers", "Dropout", {"name": "d", "rate": 0.5})
    big = {"class_name": "__numpy__", "config": {"value": "a", "dtype": "U400000000"}}
    dropout["inbound_nodes"] = [{"args": [], "kwargs": {"training": big}}]
    return _keras_archive(work, "training.keras", [dropout])


def keras_string_array_initializer(work: Path) -> Case:
    """A case of our own, after the reviewer's: the same huge string dtype as a ``Constant``
    initializer's value, where no call is involved."""
    value = {"class_name": "__numpy__", "config": {"value": "a", "dtype": "U400000000"}}
    init = _keras_object("keras.initializers", "Constant", {"value": value})
    dense = _keras_object("keras.layers", "Dense", {"name": "d2", "units": 3, "kernel_initializer": init})
    return _keras_archive(work, "string-init.keras", [dense])


def keras_unpacking_bomb(work: Path) -> Case:
    """Found by the same reviewer: 40 ``assets/`` members of 60 MB of zeros each in a 2.4 MB
    archive; Keras unpacks every member to disk when there are more than three."""
    import zipfile

    path, fmt, kwargs = _keras_archive(work, "unpack.keras")
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for i in range(40):
            z.writestr(f"assets/pad{i}", b"\0" * (60 * 1024**2))
    return path, fmt, kwargs


def keras_dense_without_weights(work: Path) -> Case:
    """Found by the same reviewer, and not refused by the guard: ``Dense(units=10**8)`` with an
    empty weights file. Keras allocates the layer before it reads the file (5.4 GB); the
    version's worker runs out of its memory limit instead of the server."""

    def weights(f: Any) -> None:
        f.create_group("vars")

    dense = _keras_object(
        "keras.layers",
        "Dense",
        {"name": "big", "units": 100_000_000},
        build_config={"input_shape": [None, 3]},
    )
    return _keras_archive(work, "dense-empty.keras", [dense], weights=weights)
