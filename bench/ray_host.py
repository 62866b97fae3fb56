"""One local Ray instance hosting Serve apps for the benchmark, in the foreground.

``python -m bench.ray_host SPEC.json`` starts Ray, one Serve HTTP proxy on
``spec["port"]``, runs each app of the spec, prints ``READY`` and then waits for
SIGTERM (or stdin to close) to shut Serve and Ray down. Ray Serve options that
are environment variables (``RAY_SERVE_THROUGHPUT_OPTIMIZED``...) are read by
every Ray process at import, so a variant is a separate host with its own env.

Ray's Python proxy (no HAProxy): the peers, and ``ours`` with ``layout: two-hop``
as it ran before the fast path (the "before" of the before/after).

Ray Serve's own model multiplexing (``multiplexed``) for ``bench/multiplexed.py``.

Spec: ``{"port": 8000, "num_cpus": 2, "apps": [{"kind": "ours"|"naive"|"noop"|"multiplexed",
"route_prefix": "/", "args": {...}}]}``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def build(kind: str, args: dict[str, Any]) -> Any:
    if kind == "ours":
        from serving.server.ray.app import build_app

        return build_app(args)
    if kind == "naive":
        from bench.baselines.naive_serve import build as naive

        return naive(args["path"])
    if kind == "noop":
        from bench.baselines.noop_serve import build as noop

        return noop()
    if kind == "multiplexed":
        from bench.baselines.multiplexed_serve import build as multiplexed

        return multiplexed(args)
    raise SystemExit(f"unknown app kind {kind!r}")


def main(spec_path: str) -> int:
    import ray
    from ray import serve

    spec = json.loads(Path(spec_path).read_text())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray.init(num_cpus=spec.get("num_cpus", 2), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
        for i, app in enumerate(spec["apps"]):
            serve.run(
                build(app["kind"], app.get("args", {})),
                name=app.get("name", f"{app['kind']}-{i}"),
                route_prefix=app["route_prefix"],
                blocking=False,
            )
        print("READY", flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
