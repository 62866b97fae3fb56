"""Model workers forked from a zygote: real zygotes, real workers, real kills."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from hostile_modules import CrashOnNegative, PidfdSignalsItsParent, SignalsItsParent, good_iris
from published import Versions
from sklearn.datasets import load_iris
from sklearn.dummy import DummyClassifier

from serving.cache import CachedVersion
from serving.errors import WorkerFailed
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPredictor
from serving.isolation.zygote import _Zygote, zygote_pids
from serving.runtime.memory import pss_bytes
from serving.runtime.service import idle_shared_bytes
from serving.testing.poll import wait_for

HERE = Path(__file__).parent
LIMITS = WorkerLimits(memory_bytes=1536 * 1024**2, predict_timeout_s=20.0, restart_backoff_s=0.1)
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> CachedVersion:
    root = tmp_path_factory.mktemp("zygote")
    return Versions(root).add(good_iris(root / "iris.joblib"), "sklearn", example=ROWS[:1].tolist())


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def _start(cached: CachedVersion, limits: WorkerLimits = LIMITS) -> WorkerPredictor:
    return WorkerPredictor(cached, LoadPolicy(), limits, model="m")


def test_a_worker_is_forked_with_its_framework_imported_or_spawned_when_asked(iris: CachedVersion) -> None:
    forked = _start(iris)
    spawned = _start(iris, dataclasses.replace(LIMITS, start="spawn"))
    try:
        assert forked.pid is not None
        assert spawned.pid is not None
        zygote = _parent(forked.pid)
        assert zygote in zygote_pids()
        assert zygote != os.getpid()
        assert os.getpgid(forked.pid) == forked.pid, "a forked worker leads its own process group"
        # NOTE: the framework came with the fork: the zygote imported scikit-learn before it.
        assert "/sklearn/" in Path(f"/proc/{zygote}/maps").read_text()
        assert _parent(spawned.pid) == os.getpid()
        # NOTE: a model set's budget counts the zygote: its workers' PSS holds only their part of its pages.
        assert idle_shared_bytes() >= pss_bytes(zygote) > 0
        name = forked.inputs[0].name
        for key in ("predict", "predict_proba"):
            np.testing.assert_array_equal(
                forked.predict({name: ROWS})[key], spawned.predict({name: ROWS})[key]
            )
    finally:
        forked.close()
        spawned.close()


def test_forked_workers_do_not_share_numpy_random_state(tmp_path: Path) -> None:
    """A fork copies NumPy's global random state; each worker reseeds it. A uniform dummy
    classifier draws its answers from that state: two workers that shared it would agree."""
    x, y = load_iris(return_X_y=True)
    path = tmp_path / "dummy.joblib"
    joblib.dump(DummyClassifier(strategy="uniform").fit(x, y), path)
    cached = Versions(tmp_path).add(path, "sklearn", example=ROWS[:1].tolist())
    first, second = _start(cached), _start(cached)
    try:
        name = first.inputs[0].name
        rows = np.tile(ROWS, (40, 1))
        answers = [w.predict_only({name: rows}, ["predict"])["predict"].tolist() for w in (first, second)]
        assert answers[0] != answers[1]
    finally:
        first.close()
        second.close()


@pytest.mark.faults
def test_a_killed_zygote_takes_its_workers_and_they_come_back_from_a_new_one(iris: CachedVersion) -> None:
    """Its workers die with it, and come back forked from a new one; no version is blamed for it
    (each is still in probation here: a version blamed would be failed)."""
    blamed: list[str] = []
    worker = WorkerPredictor(iris, LoadPolicy(), LIMITS, model="m", on_probation_failure=blamed.append)
    try:
        first = worker.pid
        assert first is not None
        zygote = _parent(first)
        os.kill(zygote, signal.SIGKILL)
        wait_for(lambda: not _alive(first), timeout=10, what="the worker ended with its zygote")
        name = worker.inputs[0].name

        def serving() -> bool:
            try:
                return worker.pid not in (None, first) and len(worker.predict({name: ROWS})) > 0
            except WorkerFailed:
                return False

        wait_for(serving, timeout=30, what="the worker back and serving")
        assert worker.pid is not None
        assert _parent(worker.pid) in zygote_pids()
        assert _parent(worker.pid) != zygote
        assert worker.last_failure == "crash: its zygote ended"
        assert blamed == []
    finally:
        worker.close()


@pytest.mark.faults
@pytest.mark.parametrize("module", [SignalsItsParent, PidfdSignalsItsParent], ids=["kill", "pidfd"])
def test_a_version_that_signals_its_zygote_fails_alone(
    iris: CachedVersion, tmp_path: Path, module: type
) -> None:
    """A confined worker cannot signal another process (the audit hook ends it; the pidfd calls,
    which raise no audit event, are gone): the zygote and the other workers it forked go on."""
    healthy = _start(iris)
    hostile = _start(Versions(tmp_path).module(module()))
    try:
        assert healthy.pid is not None
        assert hostile.pid is not None
        zygote = _parent(healthy.pid)
        assert _parent(hostile.pid) == zygote
        with pytest.raises(WorkerFailed) as info:
            hostile.predict({hostile.inputs[0].name: np.array([[-1.0, 0.0]], dtype=np.float32)})
        assert info.value.reason == "exec"
        assert _alive(zygote)
        name = healthy.inputs[0].name
        assert healthy.predict({name: ROWS})["predict"].tolist() == [0, 2]
    finally:
        healthy.close()
        hostile.close()


@pytest.mark.faults
def test_a_worker_that_crashes_retires_its_zygote(iris: CachedVersion, tmp_path: Path) -> None:
    """A crash may be one guess at what forked workers share (a stack canary, say): the next
    worker is forked from a new zygote, and the old one stops with its last worker."""
    healthy = _start(iris)
    crasher = _start(Versions(tmp_path).module(CrashOnNegative()))
    try:
        assert healthy.pid is not None
        assert crasher.pid is not None
        old = _parent(crasher.pid)
        assert _parent(healthy.pid) == old
        with pytest.raises(WorkerFailed, match="SIGSEGV"):
            crasher.predict({crasher.inputs[0].name: np.array([[-1.0, 0.0]], dtype=np.float32)})
        wait_for(
            lambda: crasher.pid is not None and _parent(crasher.pid) != old, timeout=30, what="a restart"
        )
        assert crasher.pid is not None
        assert _parent(crasher.pid) in zygote_pids()
        assert _alive(old), "the old zygote waits for its last worker"
        assert _parent(healthy.pid) == old
        healthy.close()
        wait_for(lambda: not _alive(old), timeout=10, what="the old zygote gone with its last worker")
    finally:
        healthy.close()
        crasher.close()


def test_the_zygote_reports_an_exit_status_and_kills_what_the_worker_started() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    zygote = _Zygote(env, module="zygote_child")
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        child = zygote.fork(theirs.fileno(), (), 0, timeout=60)
        theirs.close()
        mine.settimeout(60)
        sleeper = int(mine.recv(64))
        assert child.wait(30) == 3
        wait_for(lambda: not _alive(sleeper), timeout=10, what="the worker's process group killed")
        assert not child.alive()
        assert child.kill() is False, "a reaped worker is never signalled"
    finally:
        mine.close()
        theirs.close()
        zygote.close()
    assert zygote.popen.returncode is not None


_SERVER = """
import sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[1]]
from hostile_modules import good_iris
from published import Versions
from sklearn.datasets import load_iris
from sklearn.dummy import DummyClassifier
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPredictor
root = Path(sys.argv[2])
cached = Versions(root).add(good_iris(root / "iris.joblib"), "sklearn", example=[[5.1, 3.5, 1.4, 0.2]])
worker = WorkerPredictor(cached, LoadPolicy(), WorkerLimits(), model="m")
(root / "pid").write_text(str(worker.pid))
time.sleep(600)
"""


@pytest.mark.faults
def test_the_zygote_and_its_workers_end_when_the_serving_process_is_killed(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(HERE), str(tmp_path)], start_new_session=True)
    try:
        pid_file = tmp_path / "pid"
        wait_for(
            lambda: pid_file.exists() and pid_file.read_text() != "", timeout=120, what="a worker started"
        )
        worker = int(pid_file.read_text())
        zygote = _parent(worker)
        assert _parent(zygote) == proc.pid
        proc.kill()
        proc.wait(10)
        wait_for(
            lambda: not _alive(zygote) and not _alive(worker),
            timeout=10,
            what="the zygote and its worker gone after the serving process",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_EXITING = """
import json, logging, sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[1]]
from hostile_modules import good_iris
from published import Versions
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPredictor
from serving.isolation.zygote import close_zygotes

lines = []
class Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("serving").addHandler(Keep())
logging.getLogger("serving").setLevel(logging.INFO)
root = Path(sys.argv[2])
cached = Versions(root).add(good_iris(root / "iris.joblib"), "sklearn", example=[[5.1, 3.5, 1.4, 0.2]])
worker = WorkerPredictor(cached, LoadPolicy(), WorkerLimits(), model="m")
pid = worker.pid
close_zygotes()  # NOTE: what atexit runs as the serving process ends
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not any("model worker" in line for line in lines):
    time.sleep(0.05)
print(json.dumps({"pid": pid, "lines": lines}))
"""


def test_workers_that_end_with_the_serving_process_are_no_failure(tmp_path: Path) -> None:
    """At exit the zygotes stop, and their workers with them: not a failure, logged or counted,
    and no restart."""
    out = subprocess.run(
        [sys.executable, "-c", _EXITING, str(HERE), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    told = json.loads(out.stdout.strip().splitlines()[-1])
    about = [line for line in told["lines"] if "model worker" in line]
    assert about, "the worker's end was not seen"
    assert not [line for line in about if "failed" in line], about
    assert any("stopped with the server" in line for line in about), about
    assert not _alive(told["pid"])
