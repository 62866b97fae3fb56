"""A soak: many requests and many swaps against one real server, with its RSS, fds and threads.

A real ``serving serve --standalone`` (model workers at their default) serves ``iris``
from a local store. Two versions answer the seed's row differently (a
LogisticRegression says class 0, a constant model says 2), so every reply's
``model_version`` and answer must agree. Meanwhile:

- ``--connections`` keep-alive clients send the row until ``--requests`` replies came
  and the swapper is done, so every swap happens under load;
- a swapper moves ``iris@production`` between the two versions, waiting each time until
  the server reports the new version live, until ``--swaps`` swaps are done;
- a sampler records, every second, the RSS of the server and all its children (the
  model workers), the server's open fds and its threads.

Reported: failed requests, mismatches (a reply whose answer is not its version's),
swaps, and the RSS growth (median of the last tenth of the samples over the median of
the tenth after warm-up), fds and threads at the start and the end; the curves go to
``bench/results/soak.png``. The issue's bar: RSS growth under 10 %, fds and threads flat.

Run (nothing else running): ``.venv/bin/python -m bench.soak`` (defaults: 100,000
requests and 1,000 swaps; ``--swaps 200`` for a shorter run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import joblib
from sklearn.datasets import load_iris
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression

from bench.load import _read_reply
from serving.manifest import TensorSpec
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.store.local import LocalStore
from serving.testing import free_port
from serving.testing.process import stop_process

ROW = [5.1, 3.5, 1.4, 0.2]
ANSWERS = {"1": 0, "2": 2}


def publish(store: Path, work: Path) -> Repository:
    repo = Repository(LocalStore(str(store)))
    x, y = load_iris(return_X_y=True)
    models = {"1": LogisticRegression(max_iter=300), "2": DummyClassifier(strategy="constant", constant=2)}
    for version, model in models.items():
        path = work / f"iris-{version}.joblib"
        joblib.dump(model.fit(x, y), path)
        publish_path(
            repo,
            path,
            "iris",
            version=version,
            format="sklearn",
            inputs=[TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])],
            example=[ROW],
        )
    repo.move_alias("iris", "production", SetTarget("1"))
    return repo


@contextlib.contextmanager
def standalone_server(
    work: Path, serve_args: list[str], log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A real ``serving serve --standalone`` over ``work/store`` with ``serve_args``, ready; stopped after.

    Its environment is this one without ``SERVING_*`` and ``RAY_*``, its cache ``work/cache``
    and its stderr ``log``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "RAY_"))}
    env["SERVING_CACHE_DIR"] = str(work / "cache")
    cmd = [sys.executable, "-m", "serving.cli", "--store", str(work / "store"), "serve", "--standalone"]
    cmd += ["--port", str(port), "--metrics-port", "0", "--grpc-port", "0", *serve_args]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server never became ready"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield server, port
    finally:
        stop_process(server)


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def sample(pid: int) -> dict[str, float]:
    rss = 0
    pids = tree(pid)
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return {"rss_bytes": rss, "fds": fds, "threads": threads, "processes": len(pids)}


async def load(
    port: int, requests: int, connections: int, tally: dict[str, int], swapping: threading.Event
) -> None:
    body = json.dumps(
        {
            "inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [ROW]}],
            "outputs": [{"name": "predict"}],
        }
    ).encode()
    head = (
        f"POST /v2/models/iris/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while tally["sent"] < requests or swapping.is_set():
            tally["sent"] += 1
            try:
                writer.write(head + body)
                status, content, _ = await asyncio.wait_for(_read_reply(reader), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                tally["failed"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if status != 200:
                tally["failed"] += 1
                continue
            reply = json.loads(content)
            answer = int(reply["outputs"][0]["data"][0])
            if ANSWERS.get(str(reply.get("model_version"))) != answer:
                tally["mismatched"] += 1
            tally["ok"] += 1
        writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--swaps", type=int, default=1_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = Path(tmp)
        repo = publish(work / "store", work)
        serve = ["--model", "iris@production", "--poll-interval", "0.2"]
        with standalone_server(work, serve, work / "log") as (server, port):
            result = soak(server, port, repo, args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))


def soak(
    server: subprocess.Popen[bytes], port: int, repo: Repository, args: argparse.Namespace
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    samples: list[dict[str, float]] = []
    swaps = [0]
    started = time.monotonic()

    def sampler() -> None:
        while not stop.wait(1.0):
            samples.append({"t": time.monotonic() - started, "swaps": swaps[0], **sample(server.pid)})

    def swapper() -> None:
        with httpx.Client(timeout=10) as client:
            while swaps[0] < args.swaps and not stop.is_set():
                target = "2" if swaps[0] % 2 == 0 else "1"
                repo.move_alias("iris", "production", SetTarget(target))
                end = time.monotonic() + 60
                while time.monotonic() < end and not stop.is_set():
                    index = client.post(f"{url}/v2/repository/index", json={}).json()
                    if any(m.get("version") == target and m.get("converged") for m in index):
                        break
                    time.sleep(0.05)
                else:
                    continue
                swaps[0] += 1

    swapping = threading.Event()
    swapping.set()

    def swaps_then_done() -> None:
        try:
            swapper()
        finally:
            swapping.clear()

    threads = [threading.Thread(target=sampler), threading.Thread(target=swaps_then_done)]
    for t in threads:
        t.start()
    tally = {"sent": 0, "ok": 0, "failed": 0, "mismatched": 0}
    # NOTE: the clients keep going until both the requests and the swaps are done, so
    # every swap happens under load.
    asyncio.run(load(port, args.requests, args.connections, tally, swapping))
    stop.set()
    for t in threads:
        t.join()
    tenth = max(1, len(samples) // 10)
    warm, last = samples[tenth : 2 * tenth], samples[-tenth:]
    rss_warm = statistics.median(s["rss_bytes"] for s in warm or samples)
    rss_last = statistics.median(s["rss_bytes"] for s in last)
    return {
        "requests": tally["ok"] + tally["failed"],
        "failed": tally["failed"],
        "mismatched": tally["mismatched"],
        "swaps": swaps[0],
        "seconds": round(time.monotonic() - started, 1),
        "rss_growth": round(rss_last / rss_warm - 1, 4),
        "rss_warm_mib": round(rss_warm / 2**20, 1),
        "rss_last_mib": round(rss_last / 2**20, 1),
        "fds_start_end": [samples[0]["fds"], samples[-1]["fds"]],
        "threads_start_end": [samples[0]["threads"], samples[-1]["threads"]],
        "processes_start_end": [samples[0]["processes"], samples[-1]["processes"]],
        "samples": samples,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].plot(t, [s["rss_bytes"] / 2**20 for s in samples])
    axes[0].set_ylabel("RSS, server + workers (MiB)")
    axes[1].plot(t, [s["fds"] for s in samples], label="fds")
    axes[1].plot(t, [s["threads"] for s in samples], label="threads")
    axes[1].legend()
    axes[2].plot(t, [s["swaps"] for s in samples])
    axes[2].set_ylabel("swaps done")
    axes[2].set_xlabel("seconds")
    fig.suptitle(
        f"soak: {result['requests']:,} requests ({result['failed']} failed, "
        f"{result['mismatched']} mismatched), {result['swaps']} swaps; RSS growth {result['rss_growth']:.1%}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
