"""The typed data plane's types and the codecs that every transport uses.

- :mod:`serving.protocol.types`: :class:`InferRequest`, :class:`InferResponse`,
  metadata, and the one error description (:func:`describe_error`).
- :mod:`serving.protocol.tensors`: shapes, raw tensor bytes, conforming inputs to a model's specs.
- :mod:`serving.protocol.rest`: OIP v2 JSON, the binary tensor extension, and v1.
- :mod:`serving.protocol.grpc`: OIP's protobuf messages.

Nothing here routes, predicts or knows a server.
"""

from serving.protocol.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    RequestedOutput,
    ServerMetadata,
)

__all__ = ["InferRequest", "InferResponse", "ModelMetadata", "RequestedOutput", "ServerMetadata"]
