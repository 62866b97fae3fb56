"""SECURITY.md's commands run as written, in document order, in one fresh directory.

Every ``$ `` line of a ``console`` block runs (continuation lines joined),
except ``kubectl`` and ``export`` lines that only illustrate cluster settings
(the first ``export SERVING_STORE`` runs: later commands depend on it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "SECURITY.md"
_CONSOLE = re.compile(r"```console\n(.*?)\n```", re.DOTALL)


def commands() -> list[str]:
    out: list[str] = []
    for block in _CONSOLE.findall(DOC.read_text()):
        pending = ""
        for line in block.splitlines():
            if line.startswith("$ "):
                pending = line[2:]
            elif pending:
                pending += "\n" + line
            else:
                continue
            if pending.endswith("\\"):
                continue
            out.append(pending)
            pending = ""
    return [c for c in out if not c.startswith("kubectl") and "UNRESTRICTED" not in c]


def test_security_md_commands_run_as_written(tmp_path: Path) -> None:
    """keygen, signed/compressed/encrypted publish, verify, predict and pull all succeed."""
    cmds = commands()
    assert any(c.startswith("serving verify") for c in cmds)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SERVING_CACHE_DIR"] = str(tmp_path / "cache")
    make_model = (
        "import joblib; from sklearn.linear_model import LogisticRegression; "
        "joblib.dump(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), 'model.joblib')"
    )
    subprocess.run([sys.executable, "-c", make_model], cwd=tmp_path, check=True, timeout=120)
    script = "set -euo pipefail\n" + "\n".join(cmds) + "\n"
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 300}
    result = subprocess.run(["bash", "-c", script], check=False, **run)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "signed by trusted key" in result.stdout
    assert '"predict": [1]' in result.stdout
