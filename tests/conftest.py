"""Fixtures shared by every test: a real S3 server (moto) on loopback.

The server is one per session; each test gets its own bucket and its own
environment (``AWS_ENDPOINT_URL`` and test credentials set with monkeypatch),
so tests stay isolated. ``serving.testing.MotoS3`` is the reusable part.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from serving.settings import Settings
from serving.testing import MotoS3

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One moto S3 server for the session (stopped and restarted by outage tests)."""
    server = MotoS3().start()
    yield server
    server.stop()


def point_boto3_at(server: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    """Aim boto3's standard config chain at ``server``, ignoring the user's AWS setup."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "SERVING_")):
            monkeypatch.delenv(name)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture
def s3_env(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    """The session server, reachable through the environment, its counters reset."""
    if not moto_s3.running:
        moto_s3.start()
    point_boto3_at(moto_s3, monkeypatch)
    moto_s3.reset_counts()
    return moto_s3


@pytest.fixture
def bucket(s3_env: MotoS3) -> str:
    """A fresh, empty bucket for this test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    s3_env.reset_counts()
    return name


SettingsFactory = Callable[..., Settings]


def _make_settings(cache_dir: Path, store: str = "./model-store", **overrides: object) -> Settings:
    values: dict[str, object] = {
        "store": store,
        "cache_dir": cache_dir,
        "s3_addressing_style": "path",
        "s3_connect_timeout": 1.0,
        "s3_read_timeout": 5.0,
        "s3_max_attempts": 2,
        "s3_multipart_threshold": 5 * MiB,
        "progress": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_settings() -> SettingsFactory:
    """``make_settings(cache_dir, store=..., **overrides)``: small timeouts and retries,
    a 5 MiB multipart threshold (the minimum), no progress bars."""
    return _make_settings


RAY_SCOPE = "ray"


def xdist_scope(nodeid: str) -> str:
    """The unit ``make test``'s two xdist workers share tests by: a module's tests run together,
    in order, on one worker (they share module-scoped servers), and every test that starts Ray
    runs on one worker, which starts the session cluster once (one Ray instance per session).

    From the node id alone, since xdist's controller sees nothing else; the collection hook
    below checks that every Ray test maps to the Ray scope.
    """
    if nodeid.startswith("tests/integration/serve/") or "[ray" in nodeid:
        return RAY_SCOPE
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)  # NOTE: the suite still runs without xdist (pytest -p no:xdist)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    if config.getvalue("dist") != "load":
        return None  # NOTE: a --dist of the caller's choosing
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return ByScope(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a Ray test that :func:`xdist_scope` would send to the worker without the cluster."""
    strays = [
        item.nodeid
        for item in items
        if (item.get_closest_marker("ray") or "cluster" in getattr(item, "fixturenames", ()))
        and not item.get_closest_marker("cluster")
        and xdist_scope(item.nodeid) != RAY_SCOPE
    ]
    if strays:
        raise pytest.UsageError(
            f"Ray tests outside xdist_scope's Ray scope (tests/conftest.py): {strays[:5]}"
        )
