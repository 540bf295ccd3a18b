"""The payments demo: the case that motivates idempo, runnable (needs the ``demo`` extra).

A user clicks "Pay" twice, or a client times out and retries while the first
request still runs. :mod:`idempo.demo.payments` is a small FastAPI payments
API written the way a team writes it without idempo; :mod:`idempo.demo.storm`
drives a retry storm at it over real HTTP; :mod:`idempo.demo.command` is
``idempo demo``, which runs the storm against the API with and without
:class:`idempo.asgi.IdempotencyMiddleware` and prints what the layer changes.
"""

__all__: list[str] = []
