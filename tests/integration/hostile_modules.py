"""torch modules that misbehave when built, for the isolation tests (never shipped).

A torch state dict's ``class_path`` names installed code that runs when the
module is built (SECURITY.md); these stand for such code, reached through the
real ``torch-state-dict`` loader with an empty state dict. They are imported by
the isolation helper as ``tests.integration.hostile_modules``.
"""

from __future__ import annotations

import ctypes
import os
import time

import torch


class Segfault(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        ctypes.string_at(0)  # reads address 0: SIGSEGV


class Spin(torch.nn.Module):
    """Burns CPU for ever."""

    def __init__(self) -> None:
        super().__init__()
        n = 0
        while True:
            n += 1


class Hang(torch.nn.Module):
    """Waits for ever without using CPU."""

    def __init__(self) -> None:
        super().__init__()
        while True:
            time.sleep(1)


class Exec(torch.nn.Module):
    """Tries to run a shell command that would create ``sentinel``."""

    def __init__(self, sentinel: str) -> None:
        super().__init__()
        os.system(f"touch {sentinel}")  # noqa: S605 -- NOTE: the attack under test


class ShowEnv(torch.nn.Module):
    """Fails with the value of an environment variable in its message."""

    def __init__(self, name: str) -> None:
        super().__init__()
        raise ValueError(f"env {name}={os.environ.get(name, '<unset>')}")
