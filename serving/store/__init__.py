"""Object stores: one small interface, a factory keyed by URI scheme.

A store only moves bytes under keys; the layout (versions, manifests,
aliases) lives in :mod:`serving.repository`, the same for every store.
"""

from __future__ import annotations

from serving.store.base import ObjectInfo, ObjectStore, Sink
from serving.store.factory import open_store

__all__ = ["ObjectInfo", "ObjectStore", "Sink", "open_store"]
