"""``faceshield serve``: the web page and REST API on this machine (registered in :mod:`faceshield.cli.main`)."""

from __future__ import annotations

import ipaddress
import logging
import os

import click

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. The default serves this machine only; 0.0.0.0 exposes it to the network "
                   "(then use --token).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Jobs run at once (threads; models are loaded once and shared).")
@click.option("--queue", "queue_size", type=click.IntRange(1, 10_000), default=8, show_default=True,
              help="Jobs that may wait; more are answered 429 with Retry-After.")
@click.option("--token", envvar="FACESHIELD_TOKEN", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on the API (health and version excepted).")
@click.option("--ttl", "ttl_s", type=click.FloatRange(1), default=900.0, show_default=True,
              help="Seconds a finished job and its files are kept (results also go once downloaded).")
@click.option("--max-upload-mb", type=click.FloatRange(0.01), default=25.0, show_default=True,
              help="Largest photo accepted, in MB.")
@click.option("--max-pixels", type=click.IntRange(4), default=40_000_000, show_default=True,
              help="Largest photo accepted, in pixels (checked from the header, before decoding).")
@click.option("--max-photos", type=click.IntRange(1), default=20, show_default=True, help="Photos per job.")
@click.option("--keep-downloaded", is_flag=True, help="Keep results after download until the TTL.")
@click.option("--cors-origin", "cors_origins", multiple=True, show_default=True,
              help="Allow this origin to call the API from a browser (repeatable; default: CORS off).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS|auto|local]",
              help="Run the jobs on a Ray cluster ('auto', HOST:PORT, or 'local'); the server's temporary folder "
              "must then be on a filesystem every node sees.")
@click.option("--ray-workers", type=click.IntRange(1), help="Ray workers (default: fill the cluster).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="Server log level (logs never contain photos or file names).")
def serve(host, port, workers, queue_size, token, ttl_s, max_upload_mb, max_pixels, max_photos, keep_downloaded,
          cors_origins, ray_address, ray_workers, log_level) -> None:
    """Serve the web page (http://HOST:PORT/) and the REST API (/api/v1, schema at /openapi.json).

    Photos are kept in a private temporary folder and deleted after download, after --ttl seconds, or when the
    server stops. Needs the optional dependencies: pip install 'faceshield[server]'.
    """
    try:
        import uvicorn

        from faceshield.server.app import ServerSettings, create_app
    except ImportError as exc:
        raise click.ClickException(f"serve needs FastAPI and uvicorn ({exc.name} is missing); "
                                   "pip install 'faceshield[server]'") from None
    if not _is_loopback(host) and not token:
        click.echo(f"warning: serving on {host} without --token: anyone who can reach it can use it", err=True)
    settings = ServerSettings(host=host, port=port, workers=workers, queue_size=queue_size, ttl_s=ttl_s,
                              token=token or None, cors_origins=tuple(cors_origins), max_upload_mb=max_upload_mb,
                              max_pixels=max_pixels, max_photos=max_photos, delete_after_download=not keep_downloaded)
    if ray_address is not None:
        from dataclasses import replace

        from faceshield.distributed import ray_runner_factory

        # one pool of Ray workers serves every job (a second cached pool would find the cluster full)
        factory = ray_runner_factory(None if ray_address == "local" else ray_address, ray_workers)
        settings = replace(settings, runner_factory=factory, runner_cache=1)
    os.environ.setdefault("FACESHIELD_OFFLINE", "1")  # a server never downloads models behind the user's back
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"faceshield serving on http://{shown}:{port}/  (Ctrl+C to stop)", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
