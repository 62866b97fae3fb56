"""end_haproxy ends the HAProxy processes Ray left for a node, in any session, and their files."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

from serving.server.process import end_haproxy

BASE = Path("/tmp/haproxy-serve")  # NOTE: Ray 2.60 default, which end_haproxy reads


def _spawn(config: Path) -> subprocess.Popen[bytes]:
    """A process whose command line looks like Ray's HAProxy for ``config``, in its own session."""
    code = "import time; time.sleep(120)"
    return subprocess.Popen(
        [sys.executable, "-c", code, "haproxy", "-db", "-f", str(config)], start_new_session=True
    )


def test_the_nodes_haproxy_ends_and_its_folder_goes_and_other_nodes_stay() -> None:
    mine, other = f"test-{uuid.uuid4().hex}", f"test-{uuid.uuid4().hex}"
    for node in (mine, other):
        (BASE / node).mkdir(parents=True)
        (BASE / node / "haproxy.cfg").write_text("global\n")
    ours, theirs = _spawn(BASE / mine / "haproxy.cfg"), _spawn(BASE / other / "haproxy.cfg")
    try:
        end_haproxy([mine])
        deadline = time.monotonic() + 10
        while ours.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ours.poll() is not None, "the node's HAProxy outlived end_haproxy"
        assert not (BASE / mine).exists()
        assert theirs.poll() is None, "another node's HAProxy was ended"
        assert (BASE / other / "haproxy.cfg").exists()
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait()
        end_haproxy([other])
