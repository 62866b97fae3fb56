"""Isolation of first loads: real artifacts, real helper and probe child processes."""

from __future__ import annotations

import os
import pickle
import struct
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import published
import pytest
import torch
from hostile_modules import crafted_kd_tree, crafted_tree, good_iris

from serving.cache import CachedVersion
from serving.errors import IsolationFailed, LoadError, UntrustedArtifact
from serving.formats.base import LoadPolicy
from serving.isolation.prober import IsolationLimits, Prober

HOSTILE = "hostile_modules"
LIMITS = IsolationLimits(memory_bytes=768 * 1024**2, cpu_seconds=5, timeout_s=60)


class Versions(published.Versions):
    """Publishes artifacts into a local store and pulls them into a real cache."""

    def torch_module(self, class_path: str, **init_kwargs: Any) -> CachedVersion:
        path = self.root / f"{uuid.uuid4().hex[:8]}.pt"
        torch.save({}, path)
        options = {"class_path": class_path, "init_kwargs": init_kwargs}
        return self.add(path, "torch-state-dict", options=options)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    return Versions(tmp_path_factory.mktemp("iso"))


@pytest.fixture(scope="module")
def prober() -> Iterator[Prober]:
    p = Prober(LIMITS, mode="always")
    yield p
    p.close()


def test_a_good_sklearn_model_passes_and_the_pass_is_remembered(versions: Versions, tmp_path: Path) -> None:
    cached = versions.add(good_iris(tmp_path / "iris.joblib"), "sklearn", example=[[5.1, 3.5, 1.4, 0.2]])
    memo = Prober(LIMITS, memo_dir=tmp_path / "memo")
    try:
        assert memo.probe(cached, LoadPolicy(), warmup=True) is True
        assert memo.probe(cached, LoadPolicy(), warmup=True) is False  # remembered on this node
        assert memo.probe(cached, LoadPolicy(trusted_globals=frozenset({"x.y"})), warmup=True) is True
    finally:
        memo.close()


def test_a_crafted_kd_tree_is_refused_inside_the_child_before_it_runs(
    versions: Versions, prober: Prober, tmp_path: Path
) -> None:
    """Allowlisted classes only: unchecked, the warm-up died with SIGSEGV; the loaded-model
    check now refuses its index array by name, before any predict."""
    cached = versions.add(crafted_kd_tree(tmp_path / "kd.joblib"), "sklearn", example=[[0.5] * 4])
    with pytest.raises(UntrustedArtifact, match="idx_array points outside"):
        prober.probe(cached, LoadPolicy(), warmup=True)


def test_a_crafted_tree_is_refused_inside_the_child(
    versions: Versions, prober: Prober, tmp_path: Path
) -> None:
    """The tree that segfaults unchecked (tests/security) is refused by the loaded-model check."""
    cached = versions.add(crafted_tree(tmp_path / "tree.joblib"), "sklearn", example=[[0.5]])
    with pytest.raises(UntrustedArtifact, match="malformed tree"):
        prober.probe(cached, LoadPolicy(), warmup=True)


def test_a_segfault_while_building_the_module_is_a_crash(versions: Versions, prober: Prober) -> None:
    with pytest.raises(IsolationFailed) as info:
        prober.probe(versions.torch_module(f"{HOSTILE}:Segfault"), LoadPolicy(), warmup=False)
    assert info.value.reason == "crash"


def test_a_tiny_state_dict_whose_init_kwargs_build_a_huge_linear_is_refused(
    versions: Versions, prober: Prober
) -> None:
    """1 KB on disk, a 16384 x 16384 Linear when built: refused on the meta device, in the child."""
    cached = versions.torch_module("torch.nn:Linear", in_features=16384, out_features=16384)
    assert cached.manifest.total_bytes < 4096
    with pytest.raises(UntrustedArtifact, match="init_kwargs"):
        prober.probe(cached, LoadPolicy(), warmup=False)


def test_an_allocation_through_an_admitted_class_is_oom(
    versions: Versions, prober: Prober, tmp_path: Path
) -> None:
    """A 30-byte pickle calling the admitted builtins.bytearray(2**31 - 1): over the budget, an oom."""
    path = tmp_path / "bomb.pkl"
    path.write_bytes(b"\x80\x04cbuiltins\nbytearray\n(J" + struct.pack("<i", 2**31 - 1) + b"tR.")
    cached = versions.add(path, "pickle")
    with pytest.raises(IsolationFailed) as info:
        prober.probe(cached, LoadPolicy(), warmup=False)
    assert info.value.reason == "oom"


def test_an_endless_loop_hits_the_cpu_limit(versions: Versions, prober: Prober) -> None:
    with pytest.raises(IsolationFailed) as info:
        prober.probe(versions.torch_module(f"{HOSTILE}:Spin"), LoadPolicy(), warmup=False)
    assert info.value.reason == "timeout"
    assert "CPU" in str(info.value)


def test_a_load_that_hangs_hits_the_wall_clock_limit(versions: Versions) -> None:
    quick = Prober(IsolationLimits(cpu_seconds=60, timeout_s=3), mode="always")
    try:
        with pytest.raises(IsolationFailed) as info:
            quick.probe(versions.torch_module(f"{HOSTILE}:Hang"), LoadPolicy(), warmup=False)
    finally:
        quick.close()
    assert info.value.reason == "timeout"
    assert "still running" in str(info.value)


def test_starting_a_process_is_stopped_before_it_runs(
    versions: Versions, prober: Prober, tmp_path: Path
) -> None:
    sentinel = tmp_path / "executed"
    with pytest.raises(IsolationFailed) as info:
        prober.probe(versions.torch_module(f"{HOSTILE}:Exec", sentinel=str(sentinel)), LoadPolicy())
    assert info.value.reason == "exec"
    assert not sentinel.exists()


def test_a_refused_pickle_comes_back_as_the_same_error_class(
    versions: Versions, prober: Prober, tmp_path: Path
) -> None:
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            import os

            return (os.system, (f"touch {sentinel}",))

    path = tmp_path / "payload.pkl"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UntrustedArtifact) as info:
        prober.probe(versions.add(path, "pickle"), LoadPolicy(), warmup=False)
    assert not isinstance(info.value, IsolationFailed)
    assert "system" in str(info.value)
    assert not sentinel.exists()


def test_the_child_sees_no_secret_from_the_environment(
    versions: Versions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVING_ENCRYPTION_KEY", "s3cr3t-serving")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-aws")
    fresh = Prober(LIMITS, mode="always")  # its helper starts with this environment
    try:
        for name in ("SERVING_ENCRYPTION_KEY", "AWS_SECRET_ACCESS_KEY"):
            with pytest.raises(LoadError) as info:
                fresh.probe(versions.torch_module(f"{HOSTILE}:ShowEnv", name=name), LoadPolicy())
            assert f"env {name}=<unset>" in str(info.value)
            assert "s3cr3t" not in str(info.value)
    finally:
        fresh.close()


def test_the_helper_and_its_probes_run_at_a_lower_cpu_priority(versions: Versions, tmp_path: Path) -> None:
    cached = versions.add(good_iris(tmp_path / "iris.joblib"), "sklearn")
    limits = IsolationLimits(memory_bytes=768 * 1024**2, cpu_seconds=5, timeout_s=60, nice=7)
    p = Prober(limits, mode="always")
    try:
        assert p.probe(cached, LoadPolicy())
        assert p._proc is not None
        expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)  # NOTE: niceness stops at 19
        assert os.getpriority(os.PRIO_PROCESS, p._proc.pid) == expected
    finally:
        p.close()


def test_replicas_on_one_node_probe_a_new_version_once(versions: Versions, tmp_path: Path) -> None:
    cached = versions.add(good_iris(tmp_path / "iris.joblib"), "sklearn", example=[[5.1, 3.5, 1.4, 0.2]])
    probers = [Prober(LIMITS, memo_dir=tmp_path / "memo") for _ in range(3)]
    try:
        with ThreadPoolExecutor(3) as pool:
            ran = list(pool.map(lambda p: p.probe(cached, LoadPolicy(), warmup=True), probers))
        assert sorted(ran) == [False, False, True]
        assert sum(p._proc is not None for p in probers) == 1  # one helper started, not three
    finally:
        for p in probers:
            p.close()


def test_the_helper_outlives_the_thread_that_started_it(versions: Versions, tmp_path: Path) -> None:
    """Loads run on short-lived threads: the helper one of them started keeps serving the others
    (PR_SET_PDEATHSIG killed it when that thread ended, under another thread's probe)."""
    first = versions.add(good_iris(tmp_path / "a.joblib"), "sklearn", example=[[5.1, 3.5, 1.4, 0.2]])
    second = versions.add(good_iris(tmp_path / "b.joblib"), "sklearn", example=[[5.1, 3.5, 1.4, 0.2]])
    p = Prober(LIMITS, mode="always")
    try:
        starter = threading.Thread(target=p.probe, args=(first, LoadPolicy()))
        starter.start()
        starter.join(120)
        helper = p._proc
        assert helper is not None
        assert p.probe(second, LoadPolicy())
        assert p._proc is helper
        assert helper.poll() is None
    finally:
        p.close()


def test_the_helper_is_restarted_after_it_dies(versions: Versions, tmp_path: Path) -> None:
    cached = versions.add(good_iris(tmp_path / "iris.joblib"), "sklearn")
    p = Prober(LIMITS, mode="always")
    try:
        assert p.probe(cached, LoadPolicy())
        helper = p._proc
        assert helper is not None
        helper.kill()
        helper.wait(timeout=10)
        assert p.probe(cached, LoadPolicy())
        assert p._proc is not None
        assert p._proc.pid != helper.pid
    finally:
        p.close()
    assert helper.poll() is not None


def test_auto_probes_every_format_onnx_and_keras_too_and_never_isolates_nothing(
    versions: Versions, tmp_path: Path
) -> None:
    from serving.isolation.prober import needs_isolation

    cached = versions.add(good_iris(tmp_path / "iris.joblib"), "sklearn")
    assert needs_isolation("auto", cached.manifest)
    assert not needs_isolation("never", cached.manifest)
    onnx_like = cached.manifest.model_copy(update={"format": "onnx"})
    keras_like = cached.manifest.model_copy(update={"format": "keras"})
    assert needs_isolation("auto", onnx_like)
    assert needs_isolation("auto", keras_like)
    assert needs_isolation("always", onnx_like)
