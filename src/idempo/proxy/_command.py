"""``idempo proxy``: the command line of the proxy (extra ``idempo[proxy]``).

::

    idempo proxy --upstream http://127.0.0.1:8000 --listen 127.0.0.1:8080 --store sqlite:///idempo.db
    idempo proxy --config idempo-proxy.toml --workers 2 --admin-listen 127.0.0.1:9090
    idempo proxy --config idempo-proxy.toml --check-config     # load, check, exit
    idempo proxy --config idempo-proxy.toml --print-config     # the effective configuration

Flags override the file, and ``IDEMPO_PROXY_*`` variables override both
(:mod:`idempo.proxy.config`). A configuration error exits with status 1 and one
line naming the source, the key and the value.
"""

from __future__ import annotations

import click

from ..exceptions import ConfigurationError
from ._metrics import ProxyMetrics
from .config import ProxyConfigError, dump_config, load_config

__all__ = ["proxy"]


@click.command("proxy")
@click.option("--upstream", help="The API to put idempo in front of: http://host:port, https://host or unix:/path.")
@click.option("--listen", help="Where clients connect: host:port, [::1]:port or unix:/path (default 127.0.0.1:8080).")
@click.option("--store", help="The store URL: sqlite:///idempo.db (default), redis://..., postgresql://..., memory://.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="The TOML configuration file.")
@click.option("--workers", type=int, help="Server processes (above 1 the store must be shared).")
@click.option("--admin-listen", help="Where /healthz, /readyz and /metrics are served (host:port).")
@click.option("--graceful-timeout", help="On SIGTERM, how long running exchanges are awaited (e.g. 30s).")
@click.option("--disable", is_flag=True, default=None, help="Forward everything untouched: the kill switch.")
@click.option("--check-config", is_flag=True, help="Load and check the configuration, then exit.")
@click.option("--print-config", is_flag=True, help="Print the effective configuration as TOML, then exit.")
def proxy(
    upstream: str | None,
    listen: str | None,
    store: str | None,
    config_path: str | None,
    workers: int | None,
    admin_listen: str | None,
    graceful_timeout: str | None,
    disable: bool | None,
    check_config: bool,
    print_config: bool,
) -> None:
    """Put the Idempotency-Key guarantee in front of any HTTP API (a reverse proxy)."""
    flags: dict[str, object] = {
        "upstream": upstream,
        "listen": listen,
        "store": store,
        "workers": workers,
        "admin_listen": admin_listen,
        "graceful_timeout": graceful_timeout,
        "disable": True if disable else None,
    }
    try:
        config = load_config(config_path, flags=flags)
    except ProxyConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if print_config:
        click.echo(dump_config(config), nl=False)
        return
    from .app import create_app

    if check_config:
        try:
            create_app(config, metrics=_no_metrics())
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"idempo proxy: {config.source or 'the configuration'} is valid")
        return
    from ._server import run

    raise SystemExit(run(config, config_path, {k: v for k, v in flags.items() if v is not None}))


def _no_metrics() -> ProxyMetrics:

    return ProxyMetrics(False)
