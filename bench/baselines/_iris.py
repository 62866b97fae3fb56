"""The iris model every peer serves, trained in the peer's own venv (its own scikit-learn)."""

from __future__ import annotations

from typing import Any


def train() -> Any:
    """The same LogisticRegression the bench publishes for this project (``serving.demo.train``)."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=200).fit(x, y)
