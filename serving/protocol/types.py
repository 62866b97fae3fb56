"""The typed data plane: what every transport decodes a request into and encodes a response from.

REST (v2 JSON, the binary extension, v1) and gRPC each turn their wire format
into an :class:`InferRequest`, hand it to :class:`serving.dataplane.DataPlane`
and turn the :class:`InferResponse` (or a :class:`serving.errors.ServingError`)
back into their wire format. Nothing here knows a transport.

The checks every request gets, whatever carried it, run when it is built
(``__post_init__``): the model name and version are plain names (a name with
``/`` cannot reach another route), shapes have a bounded rank, and each output
is asked for at most once.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import InvalidInput, ServingError
from serving.manifest import TensorSpec, check_name

log = logging.getLogger(__name__)

MAX_RANK = 32
"""The highest rank a request's tensor may have (Triton allows 64)."""


@dataclass(frozen=True)
class RequestedOutput:
    """One output a request asks for, with its parameters (``binary_data`` on REST)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    """One inference request, as every transport hands it to the data plane.

    Args:
        model: the model's name (a plain name: letters, digits, ``.``, ``_``, ``-``).
        version: an explicit version, or None for the alias's (live or canary).
        inputs: decoded input tensors by name, in request order. Their names and
            shapes are checked against the serving version's specs under its lease.
        outputs: the outputs asked for, or None for every output.
        id: the request id echoed in the response (a new UUID when the request brings
            none, except for ``primary_only`` requests: the v1 reply has no id).
        parameters: the request's parameters.
        routing_key: the value that keeps a caller on one side of a canary split
            (a header or gRPC metadata, read by the transport), or None.
        primary_only: answer only the model's primary output (the v1 route).
        timeout_s: the request's own deadline in seconds from now (the v2 ``timeout``
            parameter, in microseconds as Triton reads it, or a gRPC deadline), or
            None. The model's ``predict_timeout_s`` caps it.
    """

    model: str
    inputs: dict[str, np.ndarray]
    version: str | None = None
    outputs: list[RequestedOutput] | None = None
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    routing_key: str | None = None
    primary_only: bool = False
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        check_model(self.model, self.version)
        timeout = self.parameters.get("timeout")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 1e15:
                raise InvalidInput("parameter 'timeout' must be a positive number of microseconds")
            asked = timeout / 1e6
            self.timeout_s = asked if self.timeout_s is None else min(self.timeout_s, asked)
        if not self.inputs:
            raise InvalidInput("'inputs' must be a non-empty list")
        for name, array in self.inputs.items():
            if array.ndim > MAX_RANK:
                raise InvalidInput(f"input {name!r}: rank {array.ndim} is over the limit of {MAX_RANK}")
        if self.outputs is not None:
            seen: set[str] = set()
            for out in self.outputs:
                if out.name in seen:
                    raise InvalidInput(f"output {out.name!r} is asked for more than once")
                seen.add(out.name)
        if not self.id and not self.primary_only:
            # NOTE: a v1 reply carries no id: a UUID a request is a few microseconds for nothing.
            self.id = request_id()

    @property
    def output_names(self) -> list[str] | None:
        return None if self.outputs is None else [o.name for o in self.outputs]


@dataclass(frozen=True)
class InferResponse:
    """The outputs of one request, in the order asked for (or the model's order)."""

    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    """OIP's response ``parameters``: ``load_wait_ms`` when the request waited for its
    model-set member to load (a cold request)."""


@dataclass(frozen=True)
class ModelMetadata:
    """What OIP's model metadata says of one version."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


def check_model(model: str, version: str | None = None) -> None:
    """Refuse a model name or version that is not a plain name, on every transport alike.

    Raises:
        InvalidReference: a 400, e.g. for ``"iris/versions/7"`` as a model name.
    """
    if not model:
        raise InvalidInput("the request names no model")
    check_name(model, "model name")
    if version is not None:
        check_name(version, "version")


_ids = random.Random()  # noqa: S311 -- NOTE: a request id, not a secret
"""Our own generator: model code may seed the global one, which would repeat ids."""
os.register_at_fork(after_in_child=_ids.seed)


def request_id() -> str:
    """A random UUID for a request that brought no ``id``.

    NOTE: ``uuid.uuid4()`` reads ``os.urandom``, which releases the GIL for its
    syscall; on a replica whose event-loop thread is busy, taking the GIL back
    cost 0.6 ms a request (py-spy: 9% of a replica's samples). ``random`` is
    reseeded in forked children (``_ids`` too), and an id need not be unguessable.
    """
    return str(uuid.UUID(int=_ids.getrandbits(128), version=4))


@dataclass(frozen=True)
class ErrorInfo:
    """An error as every transport reports it: a status (HTTP's numbers), a message, a retry hint."""

    status: int
    message: str
    retry_after_s: int | None = None


def status_of(exc: BaseException) -> int:
    """The status an error answers with (500 for anything not a ServingError), without logging it."""
    return exc.status_code if isinstance(exc, ServingError) else 500


def describe_error(exc: BaseException) -> ErrorInfo:
    """The one error handler: client mistakes keep their 4xx and message, never a 500.

    Anything that is not a :class:`ServingError` is a bug or a server fault: it is
    logged here, once, with its traceback, and reported as 500 without details.
    """
    if isinstance(exc, ServingError):
        # NOTE: a 503 that says when to come back (Overloaded) lets clients back off, not hammer.
        return ErrorInfo(exc.status_code, exc.message, exc.retry_after_s)
    log.error("unexpected error while answering a request", exc_info=exc)
    return ErrorInfo(500, f"internal error: {type(exc).__name__}")
