"""Where a request's CPU goes: CPU time per request of every process ``serving serve`` started.

``python -m bench.cpu_split [--standalone] [--seconds 10] [ENV=VALUE ...]`` publishes the
demo iris model into a temporary folder store, starts ``serving serve`` (Ray, as the
chart runs it, or ``--standalone``) with the given environment on top, runs
``wrk -t1 -c16`` at 1-row v2 requests that name their ``predict`` output, and prints,
for each process in the server's session (HAProxy, the replica, Ray's actors and
daemons), its CPU microseconds per request. CPU time per request is steadier than
requests per second on a busy machine, so it shows which process a change made
cheaper even where the throughput itself is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serving.testing import free_port

BODY = json.dumps(
    {
        "inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}],
        "outputs": [{"name": "predict"}],
    }
)


def cpu_by_process(session: int | None = None) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of every live process in ``session`` (None: every live
    process), by pid, each with its command line."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if session is None or int(fields[3]) == session:
            out[int(entry.name)] = (cmd[:80], (int(fields[11]) + int(fields[12])) / tick)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_split", description=__doc__.splitlines()[0])
    parser.add_argument("--standalone", action="store_true")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("env", nargs="*", help="ENV=VALUE set for serving serve")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cpu-split-"))
    store = str(work / "store")
    subprocess.run(
        [sys.executable, "-m", "serving.demo", "--if-empty", "--store", store],
        check=True,
        capture_output=True,
    )
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "SERVING_STORE": store, "SERVING_CACHE_DIR": str(work / "cache")}
    env.update(dict(kv.split("=", 1) for kv in args.env))
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port)]
    cmd += ["--metrics-port", str(metrics_port)]
    cmd += ["--standalone"] if args.standalone else ["--num-cpus", "2"]
    with (work / "serve.log").open("wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v2/models/iris/infer"
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serving serve did not come up; see {work / 'serve.log'}")
            try:
                if httpx.post(url, content=BODY, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        script = work / "post.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.body = [[{BODY}]]\nwrk.headers["Content-Type"] = "application/json"\n'
        )
        wrk = ["wrk", "-t1", "-c16", "-s", str(script), url]
        subprocess.run([*wrk[:3], "-d3s", *wrk[3:]], capture_output=True, check=True)  # NOTE: warm-up
        before = cpu_by_process(server.pid)
        out = subprocess.run([*wrk[:3], f"-d{args.seconds}s", *wrk[3:]], capture_output=True, text=True)
        after = cpu_by_process(server.pid)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(60)
    found = re.search(r"(\d+) requests in", out.stdout)
    if found is None:
        raise SystemExit(f"wrk printed no request count: {out.stdout} {out.stderr}")
    n = int(found.group(1))
    rows = sorted(
        ((cpu - before[pid][1], cmd) for pid, (cmd, cpu) in after.items() if pid in before),
        reverse=True,
    )
    total = sum(d for d, _ in rows)
    errors = re.search(r"Socket errors:.*", out.stdout)
    print(f"{n / args.seconds:.0f} req/s, {total / n * 1e6:.0f} us of CPU per request in all")
    if errors:
        print(errors.group(0))
    for spent, cmd in rows:
        if spent / n * 1e6 >= 5:
            print(f"  {spent / n * 1e6:6.0f} us  {cmd}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
