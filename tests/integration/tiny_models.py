"""Model classes the round-trip tests save by class path.

pytest (default ``prepend`` import mode) puts this folder on ``sys.path`` for the
tests beside it, so the class path is ``tiny_models:TinyMLP``, importable by the
loader exactly as a user's installed module would be.
"""

from __future__ import annotations

import torch


class TinyMLP(torch.nn.Module):
    """4 -> 8 -> 3: the iris shape."""

    def __init__(self, n_in: int, n_out: int, hidden: int = 8) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Gate(torch.nn.Module):
    """Answers ``x`` or ``-x`` by the sign of the batch's mean: a branch a trace keeps."""

    def __init__(self, n_in: int = 4) -> None:
        super().__init__()
        self.n_in = n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x
        return -x


class RowLoop(torch.nn.Module):
    """Doubles each row in a Python loop: a trace keeps the example's batch size."""

    def __init__(self, n_in: int = 4) -> None:
        super().__init__()
        self.n_in = n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[i] * 2 for i in range(len(x))])
