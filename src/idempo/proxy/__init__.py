"""``idempo proxy``: idempo's guarantees in front of any HTTP API, in any language.

A reverse proxy that executes each keyed request upstream at most once and
replays the stored answer to every repeat (extra ``idempo[proxy]``).

- :mod:`idempo.proxy.config`: the configuration (TOML file, flags,
  ``IDEMPO_PROXY_*`` variables), checked into frozen dataclasses; its JSON
  Schema ships as ``config.schema.json`` beside it.
- :mod:`idempo.proxy.principal`: the principal of a route whose scope is a
  verified JWT claim.

Importing this package, or :mod:`idempo.proxy.config`, needs only the core:
Starlette, PyJWT and httpx are imported when they are used.
"""

from .config import ProxyConfig, ProxyConfigError, dump_config, load_config

__all__ = ["ProxyConfig", "ProxyConfigError", "dump_config", "load_config"]
