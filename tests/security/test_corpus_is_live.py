"""Positive controls: the corpus payloads are live, so refusing them means something.

Each pickle payload is loaded with the plain, unrestricted ``pickle`` in a
separate process and must trip its sentinel there; the Keras Lambda model must
run its command when loaded with ``safe_mode=False``. Nothing here touches more
than a temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import corpus
from .corpus import PICKLE_PAYLOADS, Sentinel


def _sentinel(tmp_path: Path) -> Sentinel:
    t = Sentinel(tmp_path / "PWNED", tmp_path / "canary", tmp_path / "payload_script.py")
    t.canary.mkdir()
    corpus.write_runpy_script(t)
    return t


def _tripped_by(t: Sentinel, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not t.tripped():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("payload", sorted(PICKLE_PAYLOADS))
def test_pickle_payload_runs_under_plain_pickle(payload: str, tmp_path: Path) -> None:
    """Unrestricted pickle.loads of the payload trips the sentinel (in a child process)."""
    t = _sentinel(tmp_path)
    path = tmp_path / "payload.pkl"
    path.write_bytes(corpus.pickle_of(PICKLE_PAYLOADS[payload](t)))
    env = {**os.environ, "BROWSER": "touch"}
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())", str(path)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert _tripped_by(t, 5.0), f"{payload} did not run under plain pickle: the corpus entry is broken"


@pytest.mark.slow
def test_keras_lambda_runs_without_safe_mode(tmp_path: Path) -> None:
    """The Lambda model runs its command once loaded unsafely and called."""
    t = _sentinel(tmp_path)
    path = tmp_path / "model.keras"
    corpus.keras_lambda(path, t)
    code = (
        "import sys, numpy as np, keras; "
        "m = keras.saving.load_model(sys.argv[1], safe_mode=False); "
        "m.predict(np.array([[1.0, 2.0]]), verbose=0)"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=300, check=False)
    assert _tripped_by(t, 5.0)


def test_skops_payload_runs_when_its_types_are_trusted(tmp_path: Path) -> None:
    """Loaded with its untrusted types passed as trusted and called, the skops pipeline runs its command."""
    import numpy as np
    import skops.io

    t = _sentinel(tmp_path)
    path = tmp_path / "model.skops"
    corpus.skops_pipeline_calling(path, subprocess.run)
    untrusted = skops.io.get_untrusted_types(file=path)
    assert untrusted == ["subprocess.run"]
    model = skops.io.load(path, trusted=untrusted)
    # NOTE: the classifier then rejects subprocess.run's CompletedProcess; the command already ran.
    with contextlib.suppress(ValueError):
        model.predict(np.array(t.argv, dtype=object))
    assert _tripped_by(t, 5.0)
