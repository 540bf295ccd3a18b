"""What the HTTP fronts share, beside the sans-I/O rules of :mod:`idempo._core`.

- :mod:`.admission`: the admission of one request, written once as a step
  generator (key, content type, principal, body, identity, ``begin``, fail
  open or closed, the answer), driven by the ASGI, WSGI and Django fronts.
- :mod:`.asgi`: the per-request :class:`~idempo._http.asgi.Exchange` that
  runs an ASGI app under the lease and captures its answer.
- :mod:`.wsgi`: the same for WSGI apps and Django views: the exchange, the
  captured body, reading ``wsgi.input``.
- :mod:`.starlette`: finding the options a Starlette or FastAPI route
  declares, with the framework's own route matcher.
"""
