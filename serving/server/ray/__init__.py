"""The Ray Serve transport: deployments (:mod:`.app`), the board (:mod:`.board`), batching (:mod:`.batching`).

A Serve config names :func:`serving.server.ray.app.build_app`.
"""
