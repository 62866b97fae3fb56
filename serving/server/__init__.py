"""The transports over one data plane (:mod:`serving.dataplane`), and ``serving serve``.

- :mod:`.rest` (routes and body limits) with :mod:`.asgi` (ASGI in and out), and :mod:`.grpc`:
  each converts its wire format to the typed data plane and back.
- :mod:`.local`: model ports and load ports over models in this process.
- :mod:`.standalone`: one process, no Ray; :mod:`.ray`: Ray Serve deployments, the board, batching.
- :mod:`.launch` (``serving serve``) and :mod:`.process` (children, ports, HAProxy).
"""
