"""Process hardening and minimum safe framework versions."""

from __future__ import annotations

import os

import pytest

from serving import hardening
from serving.errors import LoadError


def test_harden_process_forces_torch_weights_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """After hardening, torch.load defaults to weights_only and the opt-out is gone."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    hardening.harden_process()
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


def test_installed_frameworks_meet_the_minimums() -> None:
    """The frameworks this project installs pass the version check."""
    for fmt in ("torch-state-dict", "keras", "onnx", "sklearn"):
        hardening.check_framework_versions(fmt)


def test_framework_older_than_minimum_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A framework below the safe minimum is refused with the reason and the fix."""
    monkeypatch.setitem(hardening.MIN_VERSIONS, "torch", ("99.0", "a future fix"))
    with pytest.raises(LoadError, match=r"older than 99\.0 \(a future fix\); upgrade torch"):
        hardening.check_framework_versions("torch-state-dict")


def test_version_parsing_handles_local_and_prerelease_tags() -> None:
    """'2.13.0+cpu' and '3.14.0rc1' compare by their numeric release parts."""
    assert hardening._parse("2.13.0+cpu") == (2, 13, 0)
    assert hardening._parse("3.14.0rc1") == (3, 14, 0)
    assert hardening._parse("2.9.1") < hardening._parse("2.10")
