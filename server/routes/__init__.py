"""HTTP routes, one module per area: ``predict`` (models + synchronous predict), ``jobs``, ``dicomweb``, ``monailabel``.

Each module exposes ``router``; :func:`server.app.create_app` includes them. Protected routers carry
``dependencies=[Depends(require_auth)]``.
"""
