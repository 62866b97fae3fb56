"""Crafted ``.keras`` archives are refused by name before Keras reads them (issue 20).

Keras safe mode admits any function Keras exports; the guard admits exact layer and
function names, and weights stored in full in the archive. Cases marked "(own)"
were not the ones the guard was written for (SECURITY.md records what held).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import crafted
import pytest

from serving.errors import UntrustedArtifact
from serving.formats.base import LoadPolicy
from serving.formats.keras_guard import check_keras_archive

CASES: dict[str, tuple[Callable[[Path], crafted.Case], str]] = {
    "Lambda over keras.ops.zeros": (crafted.keras_lambda_zeros, r"layers\[2\] is keras.layers.Lambda"),
    "Lambda over a keras.applications constructor": (crafted.keras_lambda_application, "Lambda layer"),
    "Lambda over keras.config.set_epsilon": (crafted.keras_lambda_set_epsilon, "Lambda layer"),
    "weights declared at full shape, nothing stored": (
        crafted.keras_zero_fill_weights,
        r"vars/0 declares 2147483648 bytes .* but stores 0",
    ),
    "a Lambda inside TimeDistributed (own)": (
        crafted.keras_lambda_inside_a_wrapper,
        r"layers\[2\]\.config\.layer is keras.layers.Lambda",
    ),
    "TFSMLayer, a built-in that loads a SavedModel (own)": (
        crafted.keras_savedmodel_layer,
        "TFSMLayer: it is not",
    ),
    "a built-in name registered as a custom object (own)": (
        crafted.keras_registered_custom_layer,
        "registered as 'evil>Dense'",
    ),
    "RepeatVector(n=10**9) (own)": (
        crafted.keras_repeat_bomb,
        r"config\.n is 1e\+09, over the limit of 4096",
    ),
    "a weight stored in another file (own)": (
        crafted.keras_external_weights,
        "reads its data from another file",
    ),
    "a weight linked twice, a group linked into itself (own)": (
        crafted.keras_linked_weights,
        "links to an object already seen",
    ),
    "CategoryEncoding 400 million tokens wide (reviewer)": (
        crafted.keras_category_encoding_bomb,
        r"num_tokens is 4e\+08, over the limit",
    ),
    "three UpSampling1D, each under the limit (reviewer)": (
        crafted.keras_upsampling_chain,
        r"layers\[4\]\.config\.size \(times the repeats before it\) is 1\.67772e\+07, "
        r"over the limit of 262144",
    ),
    "training= a U400000000 array (reviewer)": (
        crafted.keras_training_call_with_a_string_array,
        "calls the layer with training=",
    ),
    "a U400000000 array as a Constant initializer (own)": (
        crafted.keras_string_array_initializer,
        "is an array of dtype 'U400000000'",
    ),
    "40 assets members of 60 MB of zeros (reviewer)": (crafted.keras_unpacking_bomb, "decompression bomb"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_crafted_archive_is_refused_with_the_attribute_and_the_limit(case: str, tmp_path: Path) -> None:
    build, reason = CASES[case]
    path, _, _ = build(tmp_path)
    with pytest.raises(UntrustedArtifact, match=reason):
        check_keras_archive(path, LoadPolicy(), path.name)


def test_an_honest_archive_written_the_same_way_passes(tmp_path: Path) -> None:
    path, _, _ = crafted._keras_archive(tmp_path, "honest.keras")
    check_keras_archive(path, LoadPolicy(), path.name)


def test_a_signed_version_the_operator_opted_in_may_hold_a_lambda_but_not_hollow_weights(
    tmp_path: Path,
) -> None:
    trusted = LoadPolicy(signed=True, allow_unrestricted=True)
    path, _, _ = crafted.keras_lambda_zeros(tmp_path)
    check_keras_archive(path, trusted, path.name)
    hollow, _, _ = crafted.keras_zero_fill_weights(tmp_path)
    with pytest.raises(UntrustedArtifact, match="but stores 0"):
        check_keras_archive(hollow, trusted, hollow.name)


def test_an_archive_with_a_member_keras_never_writes_is_refused(tmp_path: Path) -> None:
    import zipfile

    path, _, _ = crafted._keras_archive(tmp_path, "extra.keras")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("model.weights.npz", b"")
    with pytest.raises(UntrustedArtifact, match=r"holds 'model\.weights\.npz'"):
        check_keras_archive(path, LoadPolicy(), path.name)


def test_models_saved_by_keras_itself_pass(tmp_path: Path) -> None:
    """The honest side: layers a reviewer found refused (augmentation, lookups, RNN wrappers,
    ConvLSTM, RMSNormalization), saved by ``model.save()``, nested, compiled."""
    import keras

    inner = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.Conv2D(4, 3)])
    image = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inner(image))
    x = keras.layers.RMSNormalization()(x)
    words = keras.Input((3,), dtype="string")
    y = keras.layers.StringLookup(vocabulary=["a", "b"], output_mode="one_hot")(words)
    y = keras.layers.Flatten()(y)
    seq = keras.Input((5, 2))
    z = keras.layers.RNN(keras.layers.LSTMCell(4))(seq)
    out = keras.layers.Dense(2)(keras.layers.Concatenate()([x, y, z]))
    model = keras.Model([image, words, seq], out)
    model.compile(optimizer="adam", loss="mse")
    path = tmp_path / "honest.keras"
    model.save(path)
    check_keras_archive(path, LoadPolicy(), path.name)
