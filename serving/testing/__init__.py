"""Public test helpers: real parts on loopback, for this project's tests and yours.

Nothing here is imported by the serving code itself; ``moto[server]`` is a dev
dependency.
"""

from __future__ import annotations

from serving.testing.registry import Registry, find_registry, run_registry
from serving.testing.repo import publish_files
from serving.testing.s3 import MotoS3, S3Request, free_port

__all__ = ["MotoS3", "Registry", "S3Request", "find_registry", "free_port", "publish_files", "run_registry"]
