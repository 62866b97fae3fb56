"""Load generators: ``wrk`` when it is installed, else a bounded asyncio HTTP/1.1 client.

Both return a :class:`LoadResult`; the async client can also keep one sample per
request (time, latency, status, served version) for the swap timeline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# NOTE: wrk's Lua `done` hook prints one JSON line we can parse; non-2xx answers
# are counted by wrk as `status` errors.
_WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
{extra_headers}
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    tool: str
    samples: list[tuple[float, float, int, str]] = field(default_factory=list)
    """(seconds since start, latency seconds, HTTP status or 0 on a transport error, version)."""
    error_kinds: dict[str, int] = field(default_factory=dict)
    """wrk's error counts by kind (connect, read, write, status, timeout), the non-zero ones."""

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def ensure_wrk() -> bool:
    """Install wrk with apt-get when it is missing and we are root; True when it is there."""
    if have_wrk():
        return True
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True, check=False)
        if not have_wrk():
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True, check=False)
    return have_wrk()


def run_wrk(
    url: str,
    body: bytes,
    *,
    connections: int,
    seconds: float,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body"
        body_path.write_bytes(body)
        script = Path(tmp) / "post.lua"
        extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
        script.write_text(_WRK_LUA.format(body=body_path, content_type=content_type, extra_headers=extra))
        proc = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result for {url}: {proc.stdout[-400:]} {proc.stderr[-400:]}")
    d = json.loads(line.removeprefix("BENCH_JSON "))
    kinds = {k: d[k] for k in ("connect", "read", "write", "status", "timeout") if d[k]}
    errors = sum(kinds.values())
    return LoadResult(
        error_kinds=kinds,
        requests=d["requests"],
        seconds=d["duration_us"] / 1e6,
        errors=errors,
        p50_ms=d["p50_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        tool="wrk -t1",
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def _async_load(
    url: str,
    body: bytes,
    connections: int,
    seconds: float,
    content_type: str,
    keep: bool,
    extra_headers: dict[str, str] | None = None,
) -> LoadResult:
    """Closed-loop HTTP/1.1 keep-alive clients over raw asyncio streams.

    NOTE: the request is serialized once and each reply is read by its
    Content-Length (or chunks): 240 us of CPU per request against httpx's 4 ms, which on a
    2-core machine is CPU the servers under test get back (httpx took 0.85 of a core
    at 200 req/s, as much as the replica it measured).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Type: {content_type}"]
    head += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    head += [f"Content-Length: {len(body)}", "", ""]
    request = "\r\n".join(head).encode() + body
    samples: list[tuple[float, float, int, str]] = []
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    started = time.perf_counter()
    deadline = started + seconds

    async def worker() -> None:
        nonlocal errors
        stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            version = ""
            try:
                if stream is None:
                    stream = await asyncio.open_connection(host, port)
                reader, writer = stream
                writer.write(request)
                status, content, close = await asyncio.wait_for(_read_reply(reader), 10.0)
                if close:
                    writer.close()
                    stream = None
                if keep and status == 200:
                    version = str(_version_of(content))
            except _REPLY_ERRORS as exc:
                status = 0
                kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
                if stream is not None:
                    stream[1].close()
                    stream = None
            elapsed = time.perf_counter() - t0
            if status != 200:
                errors += 1
                if status:
                    kinds[str(status)] = kinds.get(str(status), 0) + 1
            else:
                latencies.append(elapsed)
            if keep:
                samples.append((t0 - started, elapsed, status, version))
        if stream is not None:
            stream[1].close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    total = time.perf_counter() - started
    return LoadResult(
        requests=len(latencies) + errors,
        seconds=total,
        errors=errors,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        tool="asyncio HTTP/1.1 keep-alive client",
        samples=samples,
        error_kinds=kinds,
    )


_REPLY_ERRORS = (
    TimeoutError,
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ValueError,
    IndexError,
)


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 reply: status, body, and whether the server closes the connection."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    if "content-length" in fields:
        content = await reader.readexactly(int(fields["content-length"]))
    elif fields.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        content = b"".join(chunks)
    else:
        raise ValueError("a reply with neither Content-Length nor chunks")
    return status, content, fields.get("connection", "").lower() == "close"


def _version_of(content: bytes) -> Any:
    try:
        return json.loads(content).get("model_version", "")
    except (ValueError, AttributeError):
        return ""


def run_async(
    url: str,
    body: bytes,
    *,
    connections: int,
    seconds: float,
    content_type: str = "application/json",
    keep_samples: bool = False,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Closed-loop load from ``connections`` concurrent clients for ``seconds``."""
    return asyncio.run(_async_load(url, body, connections, seconds, content_type, keep_samples, headers))


def run_load(
    url: str,
    body: bytes,
    *,
    connections: int,
    seconds: float,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> LoadResult:
    if have_wrk():
        return run_wrk(
            url, body, connections=connections, seconds=seconds, content_type=content_type, headers=headers
        )
    return run_async(
        url, body, connections=connections, seconds=seconds, content_type=content_type, headers=headers
    )
