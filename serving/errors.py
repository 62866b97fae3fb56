"""One error tree for the whole project.

Every error carries the HTTP status the serving layer answers with and the
exit code the CLI returns, so neither layer needs its own mapping table::

    ServingError (500, exit 1)
    ├── InvalidRequest (400, exit 2)          the caller's mistake
    │   ├── InvalidReference                  "iris@", "iris:v:1"
    │   ├── InvalidManifest                   bad JSON, "../" paths, symlinks
    │   ├── UnknownFormat                     nothing recognises the artifact
    │   ├── InvalidInput                      wrong shape, datatype, JSON
    │   ├── PayloadTooLarge (413)
    │   ├── MethodNotAllowed (405)
    │   ├── RequestTimeout (408)              the body did not arrive in time
    │   ├── Unauthorized (401)                an admin route without a bearer token
    │   └── Forbidden (403)                   an admin route with the wrong token
    ├── NotFound (404, exit 3)
    │   ├── ModelNotFound
    │   ├── VersionNotFound
    │   └── AliasNotFound
    ├── VersionExists (409, exit 4)           versions are immutable
    ├── IntegrityError (422, exit 5)          bytes do not match the manifest
    ├── UntrustedArtifact (403, exit 6)       refused by the load policy
    ├── MissingExtra (501, exit 7)            framework not installed
    ├── LoadError (500, exit 8)               the framework failed to load it
    │   └── IsolationFailed                   the isolated first load crashed, ran out of
    │                                         memory or time, or tried to start a process
    ├── StoreError (502, exit 9)              the store failed us
    │   ├── StoreUnavailable (503)            unreachable, throttled, timed out
    │   ├── StoreAccessDenied (502)           wrong or missing credentials
    │   ├── StoreNotFound (502)               no such bucket or root
    │   └── StoreConflict (409)               a compare-and-swap write kept losing
    ├── NotReady (503, exit 10)               no model loaded yet
    │   ├── Overloaded (503)                  too many loads at once; has Retry-After
    │   └── WorkerFailed (503)                the model worker died or is restarting
    ├── DeadlineExceeded (504, exit 13)       predict ran past its deadline; the worker
    │                                         that ran it was stopped
    ├── CacheError (500, exit 11)             the node-local cache's disk failed us
    ├── RolloutAborted (409, exit 12)         ``serving rollout`` crossed a threshold and
    │                                         put the alias back on the old version
    ├── AliasChanged (409, exit 14)           another writer changed the canary or shadow
    │                                         a move expected (nothing was written)
    └── InternalError (500, exit 1)           a bug or fault, already logged where it
                                              happened, passed on without its details

Library errors (botocore, framework errors) are translated at the boundary
with ``raise XError(...) from exc`` so the cause stays chained.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AliasChanged",
    "AliasNotFound",
    "CacheError",
    "DeadlineExceeded",
    "Forbidden",
    "IntegrityError",
    "InternalError",
    "InvalidInput",
    "InvalidManifest",
    "InvalidReference",
    "InvalidRequest",
    "IsolationFailed",
    "LoadError",
    "MethodNotAllowed",
    "MissingExtra",
    "ModelNotFound",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RequestTimeout",
    "RolloutAborted",
    "ServingError",
    "StoreAccessDenied",
    "StoreConflict",
    "StoreError",
    "StoreNotFound",
    "StoreUnavailable",
    "Unauthorized",
    "UnknownFormat",
    "UntrustedArtifact",
    "VersionExists",
    "VersionNotFound",
    "WorkerFailed",
]


class ServingError(Exception):
    """Base of every error this project raises on purpose."""

    status_code: int = 500
    exit_code: int = 1
    retry_after_s: int | None = None
    """When set, HTTP replies carry ``Retry-After`` with this many seconds."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # NOTE: an error crosses processes (a Ray handle call: a model-set member's forward to
        # its owner, two-hop) pickled; subclasses whose constructor takes more than the message
        # would not unpickle by default, and the client would get a 500 instead of their status.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[ServingError], message: str, state: dict[str, Any]) -> ServingError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidRequest(ServingError):
    status_code = 400
    exit_code = 2


class InvalidReference(InvalidRequest):
    """A model reference that is neither ``name@alias`` nor ``name:version``."""


class InvalidManifest(InvalidRequest):
    """A manifest that cannot be parsed or names unsafe paths."""


class UnknownFormat(InvalidRequest):
    """An artifact no format loader recognises."""


class InvalidInput(InvalidRequest):
    """A predict request whose body, shape or datatype is wrong."""


class PayloadTooLarge(InvalidRequest):
    status_code = 413


class MethodNotAllowed(InvalidRequest):
    status_code = 405


class RequestTimeout(InvalidRequest):
    """The request body did not arrive within the server's body timeout."""

    status_code = 408


class Unauthorized(InvalidRequest):
    """An admin route (``POST .../load``) called without the bearer token it requires."""

    status_code = 401


class Forbidden(InvalidRequest):
    """An admin route called with a bearer token that is not the configured one."""

    status_code = 403


class NotFound(ServingError):
    status_code = 404
    exit_code = 3


class ModelNotFound(NotFound):
    pass


class VersionNotFound(NotFound):
    pass


class AliasNotFound(NotFound):
    pass


class VersionExists(ServingError):
    """Versions are immutable: publishing one that exists is refused."""

    status_code = 409
    exit_code = 4


class IntegrityError(ServingError):
    """Bytes that do not match the manifest (digest, size, file set)."""

    status_code = 422
    exit_code = 5


class UntrustedArtifact(ServingError):
    """Refused by the load policy before any byte reached a deserializer."""

    status_code = 403
    exit_code = 6


class MissingExtra(ServingError):
    """A format whose framework is not installed; names the extra to add."""

    status_code = 501
    exit_code = 7


class LoadError(ServingError):
    """The framework raised while loading or warming up a model."""

    status_code = 500
    exit_code = 8


class IsolationFailed(LoadError):
    """A version's first load, run in a child under resource limits, did not come back.

    ``reason`` is one of :data:`serving.isolation.prober.REASONS` (a bounded metric label):
    ``crash`` (killed by SIGSEGV, SIGBUS, SIGILL, SIGABRT, SIGFPE or died without
    a result), ``oom`` (MemoryError or the memory limit), ``timeout`` (wall clock
    or CPU time) or ``exec`` (tried to start a process or signal another).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StoreError(ServingError):
    status_code = 502
    exit_code = 9


class StoreUnavailable(StoreError):
    status_code = 503


class StoreAccessDenied(StoreError):
    pass


class StoreNotFound(StoreError):
    pass


class NotReady(ServingError):
    status_code = 503
    exit_code = 10


class StoreConflict(StoreError):
    """A conditional write (compare-and-swap) lost to concurrent writers every time it retried."""

    status_code = 409


class Overloaded(NotReady):
    """This replica is at its bound of concurrent loads; try again after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkerFailed(NotReady):
    """The model worker that held the request crashed, ran out of memory or broke protocol,
    or is restarting after that; ``reason`` is a bounded label. Other models are unaffected."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = 1


class DeadlineExceeded(ServingError):
    """Predict ran past the request's deadline (or the model's ``predict_timeout_s``)."""

    status_code = 504
    exit_code = 13


class CacheError(ServingError):
    """The node-local cache could not be written or read (disk full, permissions, a bad path)."""

    status_code = 500
    exit_code = 11


class RolloutAborted(ServingError):
    """An automated rollout crossed a threshold (or could not measure) and aborted the canary.

    ``result`` is the rollout's record (:class:`serving.rollout.Result`), for ``--json``.
    """

    status_code = 409
    exit_code = 12

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class AliasChanged(ServingError):
    """A move named the canary (or shadow) it expected, and the alias holds another: someone
    else changed it. Nothing was written; the message says what the alias holds and who set it."""

    status_code = 409
    exit_code = 14


class InternalError(ServingError):
    """An unexpected error, logged with its traceback where it happened, passed on as a 500.

    A model replica raises it in place of the original error, so the replica that
    received the request answers ``internal error: <type>`` without logging it twice.
    """

    status_code = 500
    exit_code = 1
