"""A cold-cache pull of one large version: the OCI registry store against S3, in one run.

One version of ``BENCH_PULL_MB`` (default 200) MB of random bytes (``serving.testing.publish_files``:
one file, no framework) is published to both stores, each a real server on loopback:

- ``s3``: moto's S3 server (``serving.testing.MotoS3``; there are no MinIO binaries here);
- ``oci``: the CNCF Distribution registry (``docker-registry``, ``serving.testing.run_registry``).

Then, in alternating order for ``BENCH_PULL_ROUNDS`` (default 5) rounds, ``LoaderCache.fetch`` pulls it
into an empty cache: every byte downloaded and checked against the manifest's SHA-256, as a replica's
first load does. The figure is the median seconds per pull and the ratio OCI over S3 (below 1.5 is
the target). Both servers and the client share the machine's cores, as on one node.

Run: ``.venv/bin/python -m bench.registry_pull`` (writes bench/results/registry_pull.json; about
a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

MB = int(os.environ.get("BENCH_PULL_MB", "200"))
ROUNDS = int(os.environ.get("BENCH_PULL_ROUNDS", "5"))
RESULTS = Path(os.environ.get("BENCH_PULL_OUT", Path(__file__).parent / "results" / "registry_pull.json"))


def pull_seconds(repo: Any, work: Path) -> float:
    """One cold pull of ``blob:1`` into a fresh cache, verified."""
    from serving.cache import LoaderCache
    from serving.manifest import ModelRef

    cache_dir = work / f"cache-{uuid.uuid4().hex[:8]}"
    cache = LoaderCache(cache_dir, 4 * MB * 1024**2)
    resolved, _ = cache.resolve(repo, ModelRef.parse("blob:1"))
    started = time.perf_counter()
    cache.fetch(repo, resolved)
    elapsed = time.perf_counter() - started
    shutil.rmtree(cache_dir, ignore_errors=True)
    return elapsed


def main() -> None:
    from serving.repository import Repository
    from serving.settings import Settings
    from serving.store.factory import open_store
    from serving.testing import MotoS3, publish_files
    from serving.testing.registry import find_registry, run_registry

    binary = find_registry()
    if binary is None:
        raise SystemExit("docker-registry is not installed (apt-get install docker-registry)")
    payload = os.urandom(MB * 1024**2)
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        work = Path(tmp)
        s3 = MotoS3().start()
        try:
            for name, value in s3.env().items():
                os.environ[name] = value
            s3.client().create_bucket(Bucket="bench")
            s3_uri = "s3://bench/models"
            s3_repo = Repository(open_store(s3_uri, Settings(store=s3_uri, s3_addressing_style="path")))
            with run_registry(binary, work / "registry") as registry:
                uri = f"oci://{registry.host}/bench"
                oci_repo = Repository(open_store(uri, Settings(store=uri, oci_plain_http=True)))
                for repo in (s3_repo, oci_repo):
                    publish_files(repo, work / "src", "blob", "1", {"weights.bin": payload})
                times: dict[str, list[float]] = {"s3": [], "oci": []}
                for i in range(ROUNDS):
                    order = [("s3", s3_repo), ("oci", oci_repo)]
                    for label, repo in order if i % 2 == 0 else reversed(order):
                        times[label].append(pull_seconds(repo, work))
        finally:
            s3.stop()
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "mb": MB,
        "rounds": ROUNDS,
        "seconds": times,
        "median_s": medians,
        "mb_per_s": {k: MB / v for k, v in medians.items()},
        "ratio_oci_over_s3": medians["oci"] / medians["s3"],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "mb_per_s", "ratio_oci_over_s3")}, indent=2))


if __name__ == "__main__":
    main()
