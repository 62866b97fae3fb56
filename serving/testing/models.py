"""Tiny estimators for tests of the serving path (picklable; allow them with SERVING_TRUSTED_GLOBALS)."""

from __future__ import annotations

from typing import Any

import numpy as np


class FailsOn:
    """Predicts 0 for every row, but raises ``RuntimeError(message)`` when any input equals ``value``.

    An unexpected error on demand, for tests that the server answers it 500 and logs it once::

        SERVING_TRUSTED_GLOBALS='["serving.testing.models.FailsOn"]'
    """

    def __init__(self, value: float, message: str) -> None:
        self.value = value
        self.message = message

    def predict(self, x: Any) -> np.ndarray:
        rows = np.asarray(x)
        if np.any(rows == self.value):
            raise RuntimeError(self.message)
        return np.zeros(len(rows), dtype=np.int64)
