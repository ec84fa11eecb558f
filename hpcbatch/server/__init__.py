"""``hpcbatch serve``: the coordinator as a daemon behind an HTTP JSON API.

* :mod:`hpcbatch.server.app`    the ASGI app (``create_app(service, keys)``)
* :mod:`hpcbatch.server.auth`   API keys (``<home>/keys.json``, hashes only)
* :mod:`hpcbatch.server.daemon` the process: uvicorn, TLS, service.json, SIGTERM

Needs the ``service`` extra (``pip install hpcbatch[service]``: fastapi, uvicorn).
"""
