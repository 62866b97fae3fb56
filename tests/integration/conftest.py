"""The ``store`` fixture (each store test runs against a folder and against S3) and ``cluster``.

``cluster`` is the one Ray instance and Serve HTTP proxy of the whole test
session. Replicas get fractional CPUs so several apps fit on 2 cores; the
dashboard is off; metrics are exported on a free port and flushed every half
second so metric tests poll briefly instead of waiting Ray's default 10 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from serving.repository import Repository
from serving.settings import Settings
from serving.store.base import ObjectStore
from serving.store.factory import open_store
from serving.testing.cluster import Cluster, local_cluster


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_uri(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "local":
        return str(tmp_path_factory.mktemp("store"))
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/models"


@pytest.fixture
def settings(store_uri: str, tmp_path_factory: pytest.TempPathFactory, make_settings: Any) -> Settings:
    return make_settings(tmp_path_factory.mktemp("cache"), store=store_uri)


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return open_store(settings.store, settings)


@pytest.fixture
def repo(store: ObjectStore) -> Repository:
    return Repository(store)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    pytest.importorskip("ray.serve")
    with local_cluster() as running:
        yield running
