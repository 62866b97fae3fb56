"""Peak RSS while a ~100 MB model swaps to its next version, against twice the model's RSS.

Run in a fresh process (``python -m bench.swap_rss STORE CACHE``) so the kernel's
peak-RSS mark (VmHWM) belongs to this measurement alone. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # NOTE: writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def main(store: str, cache_dir: str) -> dict[str, Any]:
    import gc

    from serving.cache import LoaderCache
    from serving.repository import Repository
    from serving.runtime.slot import ModelSlot
    from serving.settings import Settings
    from serving.store import open_store

    settings = Settings(store=store, cache_dir=Path(cache_dir))
    repo = Repository(open_store(store, settings))
    slot = ModelSlot("big", repo, LoaderCache(Path(cache_dir), max_bytes=4 * 1024**3), warmup=False)
    gc.collect()
    base = _status_kb("VmRSS")
    slot.swap_to(repo.resolve("big:1"), reason="start")
    gc.collect()
    one = _status_kb("VmRSS") - base
    _reset_peak()
    before_swap = _status_kb("VmRSS")
    slot.swap_to(repo.resolve("big:2"))
    gc.collect()
    peak = _status_kb("VmHWM") - base
    after = _status_kb("VmRSS") - base
    slot.close()
    return {
        "model_rss_mb": one / 1024,
        "peak_during_swap_mb": peak / 1024,
        "rss_after_swap_mb": after / 1024,
        "rss_before_swap_mb": (before_swap - base) / 1024,
        "ratio_peak_over_twice_model": peak / (2 * one) if one else None,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
