"""The small torch MLP of workload c, as installed code (state dicts load into a known class)."""

from __future__ import annotations

import torch


class MLP(torch.nn.Module):
    def __init__(self, inputs: int = 64, hidden: int = 256, outputs: int = 10) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(inputs, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
