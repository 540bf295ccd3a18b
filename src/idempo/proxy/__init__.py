"""``idempo proxy``: idempo's guarantees in front of any HTTP API, in any language.

A reverse proxy that executes each keyed request upstream at most once and
replays the stored answer to every repeat (extra ``idempo[proxy]``).

- :func:`create_app` (:mod:`idempo.proxy.app`): the proxy's ASGI app for a
  configuration; :func:`app_factory` builds it from ``IDEMPO_PROXY_*``
  variables, for ``uvicorn --factory idempo.proxy:app_factory``.
- :mod:`idempo.proxy.config`: the configuration (TOML file, flags,
  ``IDEMPO_PROXY_*`` variables), checked into frozen dataclasses; its JSON
  Schema ships as ``config.schema.json`` beside it.
- :mod:`idempo.proxy.forwarder`: the connection to the upstream behind a
  small interface: httpx's transport, or an aiohttp connector
  (:mod:`idempo.proxy.aiohttp_forwarder`), as ``[upstream] client`` says.
- :mod:`idempo.proxy.principal`: the principal of a route whose scope is a
  verified JWT claim.

Importing this package, or :mod:`idempo.proxy.config`, needs only the core:
Starlette, PyJWT, httpx and aiohttp are imported when they are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import ProxyConfig, ProxyConfigError, dump_config, load_config

if TYPE_CHECKING:
    from .app import ProxyApp

__all__ = ["ProxyConfig", "ProxyConfigError", "app_factory", "create_app", "dump_config", "load_config"]


def create_app(config: ProxyConfig, **options: Any) -> ProxyApp:
    """The proxy's ASGI app for ``config``: :func:`idempo.proxy.app.create_app` (needs ``idempo[proxy]``)."""
    from .app import create_app as create

    return create(config, **options)


def app_factory(environ: Mapping[str, str] | None = None) -> ProxyApp:
    """The app the ``IDEMPO_PROXY_*`` variables configure: :func:`idempo.proxy.app.app_factory`.

    For ``uvicorn --factory idempo.proxy:app_factory`` (and gunicorn's ``UvicornWorker``).

    Raises:
        ProxyConfigError: the configuration is wrong (the message names the key).
    """
    from .app import app_factory as factory

    return factory(environ)
