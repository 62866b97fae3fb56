"""Progressive delivery, measured against a running server: traffic, canary split, shadow overhead.

::

    python -m bench.progressive traffic --url http://127.0.0.1:8000 --model iris --seconds 30
    python -m bench.progressive split --url http://127.0.0.1:8000 --model iris --requests 1000
    python -m bench.progressive shadow --url http://127.0.0.1:8000 --model iris --store ./store \\
        --version 2 --requests 2000

``traffic`` sends requests in a loop (what a rollout measures; the README's
walkthrough uses it). ``split`` counts which version answered. ``shadow``
measures, in one run, p50/p99 client latency with no shadow and with a shadow
of ``--version`` mirroring every request, alternating blocks of requests so
that both see the same machine load; it sets and drops the shadow itself
(``serving alias set --shadow`` / ``abort``), so the alias must have none.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx

ROW = [[5.1, 3.5, 1.4, 0.2]]


def _body(rows: list[list[float]]) -> bytes:
    doc = {
        "inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64", "data": rows}]
    }
    return json.dumps(doc).encode()


def _infer(
    client: httpx.Client, url: str, model: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return client.post(f"{url}/v2/models/{model}/infer", content=_body(ROW), headers=headers)


def traffic(url: str, model: str, seconds: float, clients: int = 2) -> dict[str, Any]:
    """Requests from ``clients`` threads for ``seconds``, one iris flower each (all 150, shuffled):
    replies by version and status."""
    from sklearn.datasets import load_iris

    rows = load_iris().data.tolist()
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(seed: int) -> None:
        order = random.Random(seed).sample(rows, len(rows))
        with httpx.Client(timeout=10) as client:
            i = 0
            while time.monotonic() < deadline:
                try:
                    r = client.post(f"{url}/v2/models/{model}/infer", content=_body([order[i % len(order)]]))
                except httpx.HTTPError as exc:
                    with lock:
                        counts[type(exc).__name__] += 1
                    time.sleep(0.1)  # NOTE: the server is gone or restarting; do not spin
                    continue
                i += 1
                key = (
                    f"{r.json().get('model_version')} {r.status_code}"
                    if r.status_code == 200
                    else str(r.status_code)
                )
                with lock:
                    counts[key] += 1

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(counts)


def split(url: str, model: str, requests: int) -> dict[str, Any]:
    with httpx.Client(timeout=10) as client:
        versions = Counter(_infer(client, url, model).json()["model_version"] for _ in range(requests))
    return {v: {"requests": n, "share": round(n / requests, 4)} for v, n in sorted(versions.items())}


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "requests": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3),
    }


def shadow_overhead(
    url: str, model: str, store: str, version: str, requests: int, block: int = 100
) -> dict[str, Any]:
    """Client latency without and with a shadow mirroring every request, in alternating blocks."""
    from serving.repository import Abort, Repository, SetShadow
    from serving.settings import Settings
    from serving.store import open_store

    repo = Repository(open_store(store, Settings(store=store)))
    alias = "production"
    plain: list[float] = []
    shadowed: list[float] = []

    def applied(client: httpx.Client, want: bool) -> bool:
        entry = next(e for e in client.get(f"{url}/v2/repository/index").json() if e["name"] == model)
        states = [r.get("shadow") or {} for r in entry["replicas"]]
        return all(bool(s.get("loaded")) == want for s in states)

    def wait(client: httpx.Client, want: bool) -> None:
        deadline = time.monotonic() + 60
        while not applied(client, want):
            if time.monotonic() > deadline:
                raise SystemExit("the shadow was not applied within 60 s")
            time.sleep(0.1)

    with httpx.Client(timeout=10) as client:
        for _ in range(20):
            _infer(client, url, model)  # NOTE: warm the connection and the model
        on = False
        while len(plain) + len(shadowed) < requests:
            into = shadowed if on else plain
            for _ in range(block):
                started = time.perf_counter()
                r = _infer(client, url, model)
                into.append(time.perf_counter() - started)
                assert r.status_code == 200, r.text
            on = not on
            if on:
                repo.move_alias(model, alias, SetShadow(version, 1.0))
            else:
                repo.move_alias(model, alias, Abort())
            wait(client, on)
        if on:
            repo.move_alias(model, alias, Abort())
        entry = next(e for e in client.get(f"{url}/v2/repository/index").json() if e["name"] == model)
    shadow_figures = entry["figures"].get(version, {})
    return {
        "without_shadow": _percentiles(plain),
        "with_shadow": _percentiles(shadowed),
        "shadow_compared": shadow_figures.get("compared"),
        "shadow_disagreed": shadow_figures.get("disagreed"),
        "shadow_dropped": shadow_figures.get("dropped"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.progressive", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("traffic", "split", "shadow"):
        p = sub.add_parser(name)
        p.add_argument("--url", default="http://127.0.0.1:8000")
        p.add_argument("--model", default="iris")
        if name == "traffic":
            p.add_argument("--seconds", type=float, default=30)
            p.add_argument("--clients", type=int, default=2)
        else:
            p.add_argument("--requests", type=int, default=1000)
        if name == "shadow":
            p.add_argument("--store", required=True)
            p.add_argument("--version", required=True)
    args = parser.parse_args()
    if args.what == "traffic":
        out = traffic(args.url, args.model, args.seconds, args.clients)
    elif args.what == "split":
        out = split(args.url, args.model, args.requests)
    else:
        out = shadow_overhead(args.url, args.model, args.store, args.version, args.requests)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
