"""What compression, encryption and signing cost on the demo models.

Models: the demo iris LogisticRegression (joblib), a small torch MLP state dict
(4 -> 64 -> 64 -> 3, as a quick-start model would be) and a larger MLP
(1024 -> 2048 -> 2048 -> 10, ~25 MB) so throughput shows. Each is published in
five modes (plain, zstd, gzip, aesgcm, zstd+aesgcm) to a local folder and to a
moto S3 server on loopback; every round pulls it cold (fresh cache dir) through
``LoaderCache.fetch``. Modes alternate within each round.

Reports stored bytes (and the saving against plain), publish time, and the
median cold-pull time with its ratio against plain; plus Ed25519 sign/verify
time per manifest.

Run: ``.venv/bin/python -m bench.trust`` (writes bench/results/trust.json).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "trust.json"
ROUNDS = 7
MODES: dict[str, tuple[str | None, bool]] = {
    "plain": (None, False),
    "zstd": ("zstd", False),
    "gzip": ("gzip", False),
    "aesgcm": (None, True),
    "zstd+aesgcm": ("zstd", True),
}


def make_models(root: Path) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    import joblib
    import torch
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    iris = root / "iris.joblib"
    joblib.dump(LogisticRegression(max_iter=200).fit(x, y), iris)

    torch.manual_seed(0)
    small = root / "mlp-small.pt"
    torch.save(
        torch.nn.Sequential(
            torch.nn.Linear(4, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 3),
        ).state_dict(),
        small,
    )
    large = root / "mlp-25mb.pt"
    torch.save(
        torch.nn.Sequential(
            torch.nn.Linear(1024, 2048),
            torch.nn.ReLU(),
            torch.nn.Linear(2048, 2048),
            torch.nn.Linear(2048, 10),
        ).state_dict(),
        large,
    )
    seq = {"class_path": "torch.nn:Sequential"}
    return {
        "iris (joblib)": (iris, "sklearn", {}),
        "torch MLP small": (small, "torch-state-dict", seq),
        "torch MLP 25 MB": (large, "torch-state-dict", seq),
    }


def bench_store(label: str, store_uri: str, models: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    from serving.cache import LoaderCache
    from serving.crypto import Keyring, LocalKek
    from serving.encoding import EncodeOptions
    from serving.publish import publish_path
    from serving.repository import Repository
    from serving.settings import Settings
    from serving.store.factory import open_store

    settings = Settings(store=store_uri, s3_addressing_style="path", progress=False)
    repo = Repository(open_store(store_uri, settings))
    kek = LocalKek(os.urandom(32))
    keyring = Keyring([kek])
    rows: list[dict[str, Any]] = []
    for model, (path, fmt, options) in models.items():
        published: dict[str, dict[str, Any]] = {}
        for i, (mode, (compress, encrypt)) in enumerate(MODES.items()):
            name = f"m{abs(hash(model)) % 10**6}"
            started = time.perf_counter()
            manifest = publish_path(
                repo,
                path,
                name,
                version=str(i + 1),
                format=fmt,
                options=options,
                encode=EncodeOptions(compress, kek if encrypt else None),
            )
            publish_s = time.perf_counter() - started
            stored = sum(f.stored_bytes for f in manifest.files)
            published[mode] = {
                "ref": f"{name}:{i + 1}",
                "stored": stored,
                "publish_s": publish_s,
                "pulls": [],
            }
        for r in range(ROUNDS):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                cache_dir = work / f"cache-{label}-{r}-{mode}"
                cache = LoaderCache(cache_dir, keyring=keyring)
                resolved = repo.resolve(published[mode]["ref"])
                started = time.perf_counter()
                cache.fetch(repo, resolved)
                published[mode]["pulls"].append(time.perf_counter() - started)
                shutil.rmtree(cache_dir)
        plain = published["plain"]
        plain_pull = statistics.median(plain["pulls"])
        for mode, p in published.items():
            pull = statistics.median(p["pulls"])
            rows.append(
                {
                    "store": label,
                    "model": model,
                    "mode": mode,
                    "logical_bytes": path.stat().st_size,
                    "stored_bytes": p["stored"],
                    "saved_pct": round(100 * (1 - p["stored"] / plain["stored"]), 1),
                    "publish_ms": round(1000 * p["publish_s"], 2),
                    "pull_ms_median": round(1000 * pull, 2),
                    "pull_vs_plain": round(pull / plain_pull, 2),
                }
            )
    return rows


def bench_signing() -> dict[str, float]:
    from serving.manifest import FileEntry, Manifest
    from serving.signing import (
        generate_keypair,
        load_signing_key,
        load_trusted_keys,
        sign_manifest,
        verify_manifest,
    )

    with tempfile.TemporaryDirectory() as d:
        pair = generate_keypair(Path(d) / "k")
        key = load_signing_key(pair.key_path)
        trusted = load_trusted_keys([pair.pub_path])
    files = [FileEntry(path=f"f{i}", size=i, sha256="a" * 64) for i in range(10)]
    raw = Manifest(name="m", version="1", format="sklearn", files=files).to_json()
    n = 500
    started = time.perf_counter()
    for _ in range(n):
        sig = sign_manifest(raw, key)
    sign_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for _ in range(n):
        verify_manifest(raw, sig, trusted, "m", "1")
    verify_us = (time.perf_counter() - started) / n * 1e6
    return {"sign_us": round(sign_us, 1), "verify_us": round(verify_us, 1)}


def main() -> dict[str, Any]:
    from serving.testing import MotoS3

    with tempfile.TemporaryDirectory(prefix="bench-trust-") as d:
        work = Path(d)
        models = make_models(work)
        rows = bench_store("local", str(work / "store"), models, work)
        server = MotoS3().start()
        try:
            os.environ.update(server.env())
            server.client().create_bucket(Bucket="bench")
            rows += bench_store("s3 (moto, loopback)", "s3://bench/models", models, work)
        finally:
            server.stop()
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rounds": ROUNDS,
        "rows": rows,
        "signing": bench_signing(),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{'store':<20} {'model':<16} {'mode':<12} {'stored':>10} {'saved':>7} {'pull ms':>9} {'x plain':>8}"
    )
    for r in result["rows"]:
        print(
            f"{r['store']:<20} {r['model']:<16} {r['mode']:<12} {r['stored_bytes']:>10} "
            f"{r['saved_pct']:>6}% {r['pull_ms_median']:>9} {r['pull_vs_plain']:>8}"
        )
    s = result["signing"]
    print(f"Ed25519 per manifest: sign {s['sign_us']} us, verify {s['verify_us']} us")


if __name__ == "__main__":
    main()
