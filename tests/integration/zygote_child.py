"""A zygote whose children start a native descendant and exit 3, for tests/integration/test_zygote.py
(``python -m zygote_child zygote PARENT_PID FD``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

from serving.isolation.zygote import serve


def child(fd: int, request: dict[str, Any]) -> int:
    """Start ``sleep`` in this child's process group, tell the test its pid, exit 3."""
    sleeper = subprocess.Popen(["sleep", "300"])
    with socket.socket(fileno=fd) as sock:
        sock.send(str(sleeper.pid).encode())
    return 3


if __name__ == "__main__":
    assert sys.argv[1] == "zygote"
    sys.exit(serve(int(sys.argv[2]), int(sys.argv[3]), lambda formats: None, child))
