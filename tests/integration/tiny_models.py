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
