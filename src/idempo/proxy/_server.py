"""Running the proxy: uvicorn serving :class:`~idempo.proxy.app.ProxyApp`, the admin port, workers, SIGTERM.

:func:`run` is what ``idempo proxy`` does once its configuration is loaded:

- one worker: the proxy and the admin port are two uvicorn servers in one
  event loop;
- ``workers`` above 1: this process binds the listening socket, starts that
  many worker processes (each a uvicorn server on the shared socket; their
  metrics go to a ``PROMETHEUS_MULTIPROC_DIR`` of their own) and serves the
  admin port itself.

On SIGTERM (or SIGINT) readiness goes to 503 at once, the listening socket
closes, and in-flight and detached exchanges are awaited up to
``graceful_timeout``; an exchange still running then is cut off and keeps its
lease. Then the saves still retried in the background (a store that failed
as a record was saved) are awaited up to ``idempo._engine.lease.SHUTDOWN_WAIT``
seconds, as the ASGI middleware's lifespan does, before the store closes.
The first line on stdout says where the proxy listens
(``idempo proxy: listening on http://127.0.0.1:8080``), then, with an admin
port, ``idempo proxy: admin on http://127.0.0.1:9090``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from .._engine import lease
from .config import ListenAddress, ProxyConfig, load_config

__all__ = ["bind", "run"]


def bind(address: ListenAddress) -> socket.socket:
    """A listening socket on ``address`` (port 0: any free port; ``unix:``: a Unix socket).

    Raises:
        OSError: the address cannot be bound.
    """
    if address.uds is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.uds)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.uds)
    else:
        assert address.host is not None
        assert address.port is not None
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host, port = name[0], name[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _instrument() -> None:
    """Record idempo's own metrics (served on the admin port beside the proxy's)."""
    try:
        from ..observability import instrument

        instrument(metrics=True)
    except ImportError:  # pragma: no cover - prometheus-client is in idempo[proxy]
        pass


def _uvicorn_config(app: Any, config: ProxyConfig, **extra: Any) -> Any:
    import uvicorn

    options: dict[str, Any] = {
        "lifespan": "on",
        # The upstream's Date and Server reach the client; the proxy adds none of its own.
        "date_header": False,
        "server_header": False,
        "access_log": False,
        # X-Forwarded-* are the proxy's to write (trusted_proxies), never uvicorn's to believe.
        "proxy_headers": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": max(1, round(config.proxy.graceful_timeout)),
    }
    return uvicorn.Config(app, **{**options, **extra})


def _proxy_server(app: Any, config: ProxyConfig, ready: Any = None) -> Any:
    """uvicorn's server for the proxy; ``ready`` (a multiprocessing Event) is set once it serves."""
    import uvicorn

    class _ProxyServer(uvicorn.Server):
        """uvicorn's server, but a drain ended by SIGTERM exits with status 0 (uvicorn raises the signal again)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if ready is not None and self.started:
                ready.set()  # the app's lifespan start-up is done and the socket is served

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {signum: signal.signal(signum, self.handle_exit) for signum in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for signum, handler in original.items():
                    signal.signal(signum, handler)

    return _ProxyServer(_uvicorn_config(app, config))


def _admin_server(app: Any, config: ProxyConfig) -> Any:
    import uvicorn

    class _AdminServer(uvicorn.Server):
        """The admin port's server: the proxy's server (or this process) handles the signals."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return _AdminServer(_uvicorn_config(app, config, timeout_graceful_shutdown=1))


def _runner() -> asyncio.Runner:
    """An event loop runner: uvloop's loop when it is installed (uvicorn[standard]), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _say(line: str) -> None:
    print(f"idempo proxy: {line}", flush=True)


def run(config: ProxyConfig, path: str | None = None, flags: Mapping[str, object] | None = None) -> int:
    """Serve the proxy until SIGTERM; the exit status.

    Args:
        config: the loaded configuration.
        path: the configuration file (worker processes load it again).
        flags: the command line's overrides (worker processes apply them again).
    """
    sock = bind(config.proxy.listen)
    admin_sock = bind(config.proxy.admin_listen) if config.proxy.admin_listen is not None else None
    _say(f"listening on {_url(sock)}, forwarding to {config.proxy.upstream.url}")
    if admin_sock is not None:
        _say(f"admin on {_url(admin_sock)}")
    if config.proxy.workers == 1:
        with _runner() as runner:
            runner.run(_serve_one(config, sock, admin_sock))
        return 0
    return _supervise(config, path, dict(flags or {}), sock, admin_sock)


async def _serve_one(config: ProxyConfig, sock: socket.socket, admin_sock: socket.socket | None) -> None:

    from ._admin import AdminApp
    from .app import create_app

    _instrument()
    app = create_app(config)
    server = _proxy_server(app, config)
    if admin_sock is None:
        await server.serve(sockets=[sock])
        return
    admin_app = AdminApp(
        app.store,
        config.proxy.upstream,
        lambda: server.should_exit or app.draining,
        workers=lambda: (1 if server.started else 0, 1),
    )
    admin = _admin_server(admin_app, config)
    admin_task = asyncio.create_task(admin.serve(sockets=[admin_sock]))
    try:
        await server.serve(sockets=[sock])
    finally:
        admin.should_exit = True
        await admin_task


def _worker(path: str | None, flags: dict[str, object], sock: socket.socket, ready: Any) -> None:
    """One worker process: load the configuration again, serve on the shared socket until SIGTERM.

    ``ready`` (a multiprocessing Event) is set once it serves: the admin port's /readyz counts it.
    """

    from .app import create_app

    config = load_config(path, flags=flags)
    _instrument()
    _proxy_server(create_app(config), config, ready).run(sockets=[sock])


def _supervise(
    config: ProxyConfig,
    path: str | None,
    flags: dict[str, object],
    sock: socket.socket,
    admin_sock: socket.socket | None,
) -> int:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    own_dir = None
    if not metrics_dir:
        own_dir = tempfile.TemporaryDirectory(prefix="idempo-proxy-metrics-")
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir.name
    context = multiprocessing.get_context("spawn")
    ready = [context.Event() for _ in range(config.proxy.workers)]
    workers = [
        context.Process(target=_worker, args=(path, flags, sock, ready[n]), name=f"idempo-proxy-{n}")
        for n in range(config.proxy.workers)
    ]
    for process in workers:
        process.start()
    try:
        with _runner() as runner:
            runner.run(_supervise_async(config, workers, ready, admin_sock))
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()
                process.join()
        if own_dir is not None:
            own_dir.cleanup()
    # A worker still starting when the SIGTERM came ends by it (before uvicorn handles signals): a clean stop too.
    return 0 if all(process.exitcode in (0, -signal.SIGTERM) for process in workers) else 1


async def _supervise_async(
    config: ProxyConfig, workers: list[Any], ready: list[Any], admin_sock: socket.socket | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    draining = False
    admin = admin_task = None
    store = None
    if admin_sock is not None:
        from .. import _config
        from ._admin import AdminApp

        store = _config.async_store(config.proxy.store)

        def serving() -> tuple[int, int]:
            """Workers alive whose server started (a worker that died is not serving)."""
            return sum(1 for p, e in zip(workers, ready, strict=True) if p.is_alive() and e.is_set()), len(workers)

        admin_app = AdminApp(store, config.proxy.upstream, lambda: draining, workers=serving)
        admin = _admin_server(admin_app, config)
        admin_task = asyncio.create_task(admin.serve(sockets=[admin_sock]))

    async def any_exit() -> None:
        await asyncio.to_thread(multiprocessing.connection.wait, [p.sentinel for p in workers])

    exited = asyncio.create_task(any_exit())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    draining = True
    for process in workers:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    # A worker's shutdown waits graceful_timeout for its exchanges, then up to SHUTDOWN_WAIT for the saves
    # still retried in the background (ProxyApp.shutdown); past that patience it is killed.
    patience = config.proxy.graceful_timeout + lease.SHUTDOWN_WAIT + 5
    await asyncio.to_thread(_join_all, workers, patience)
    stopping.cancel()
    if admin is not None and admin_task is not None:
        admin.should_exit = True
        await admin_task
    if store is not None:
        await store.aclose()


def _join_all(workers: list[Any], patience: float) -> None:
    import time

    deadline = time.monotonic() + patience
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
