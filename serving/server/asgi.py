"""ASGI in and out of the REST API: an HTTP scope becomes an HttpRequest, a Reply becomes messages.

Both HTTP transports speak ASGI underneath (uvicorn in the standalone server;
Ray Serve hands its replicas the request's ASGI scope and ``receive``), so both
convert here, the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from serving.errors import InvalidInput
from serving.protocol.rest import Reply
from serving.server.rest import HttpRequest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def request_from_asgi(scope: Scope, receive: Receive) -> HttpRequest:
    """The REST API's view of an ASGI HTTP request (header names lower-case, latin-1).

    The path is the raw one as sent (``raw_path``, percent-encoded) where the server gives it.
    """
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}

    async def body() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("the client disconnected before sending the whole body")
            chunk: bytes = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    return HttpRequest(
        method=scope["method"],
        path=raw.decode("latin-1") if (raw := scope.get("raw_path")) else scope["path"],
        headers=headers,
        body=body,
        root_path=scope.get("root_path", ""),
    )


def reply_headers(reply: Reply) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", reply.content_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
    ]
    # NOTE: Retry-After, WWW-Authenticate, the binary extension's Inference-Header-Content-Length.
    headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    return headers


async def send_reply(send: Send, reply: Reply) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply_headers(reply)})
    await send({"type": "http.response.body", "body": reply.body})
