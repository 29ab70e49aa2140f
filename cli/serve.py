"""``backbones serve``: BentoML's server running the service (service/bento.py), configured through
the settings, which the server's worker processes read from the environment."""

from __future__ import annotations

import os
import sys

import click

from .common import SettingOption, handle_errors

# Environment variables that make BentoML 1.4 run workers without respawn (bentoml.serving.running_inside_container).
CONTAINER_MARKERS = ("BENTOML_CONTAINERIZED", "BENTOCLOUD_DEPLOYMENT_URL")
SERVICE = "service.bento:Backbones"
BENTOML_DEFAULT = "BentoML's: {env}, else its configuration"  # the port is BentoML's to default
# only this machine can connect unless --host says otherwise (containers pass --host 0.0.0.0)
DEFAULT_HOST = "127.0.0.1"


def bentoml_args(host: str | None, port: int | None) -> list[str]:
    """The ``bentoml serve`` command line; an address left out is BentoML's own (BENTOML_HOST and
    BENTOML_PORT, else its configuration)."""
    args = [sys.executable, "-m", "bentoml", "serve", SERVICE]
    if host is not None:
        args += ["--host", host]
    if port is not None:
        args += ["--port", str(port)]
    return args


@click.command("serve")
@click.option(
    "--model",
    "refs",
    cls=SettingOption,
    setting="serve_models",
    multiple=True,
    metavar="REF",
    help="A model to serve (repeat for several; the first is the default).",
)
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    help="Address to listen on; by default only this machine can connect (deploy/ listens on every interface).",
)
@click.option(
    "-p",
    "--port",
    type=click.IntRange(1, 65535),
    show_default=BENTOML_DEFAULT.format(env="BENTOML_PORT"),
    help="Port to listen on.",
)
@click.option("--workers", cls=SettingOption, setting="workers", type=click.IntRange(0, 256))
@handle_errors
def serve_cmd(refs: tuple[str, ...], host: str, port: int | None, workers: int | None) -> None:
    """Serve classification and embedding over HTTP (BentoML).

    Endpoints: POST /classify and POST /embed (multipart field 'image'; optional 'model' and
    'top_k'), GET /models, /livez, /readyz, /metrics, and the OpenAPI page at /. With API keys set
    (BACKBONES_API_KEYS or BACKBONES_API_KEYS_FILE), every route but the probes and /metrics needs
    'Authorization: Bearer KEY'. A served NAME or NAME@ALIAS follows its alias: `backbones models
    alias` switches the running service to the new version without failing a request. Tuning knobs
    (workers, runners, batch size, queue limit, threads, limits on connections and bodies): see the
    README's Configuration table.
    """
    from models import Settings
    from models.registry import Ref
    from service.auth import load_key_digests

    given = {"serve_models": ",".join(refs) if refs else None, "workers": workers}
    overrides = {field: value for field, value in given.items() if value is not None}
    # a bad BACKBONES_* value or reference fails here, in one line, not in a server worker
    settings = Settings(**overrides)  # type: ignore[arg-type]
    chosen = settings.served_refs()
    for ref in chosen:
        Ref.parse(ref)
    keys = load_key_digests(settings)  # a short key or a bad key file fails here, naming the setting
    os.environ.update(Settings.env_for(**overrides))  # the workers read the same settings
    # Inside a container BentoML does not restart a worker that dies (the container would be
    # restarted instead, losing every worker's requests): the arbiter replaces dead workers here.
    for name in CONTAINER_MARKERS:
        os.environ.pop(name, None)
    where = f"on http://{host}:{port}" if port else f"on {host}, at the port BentoML logs next"
    auth = f"API keys required ({len(keys)})" if keys else "no API key required"
    click.echo(f"serving {', '.join(chosen)} {where}; {auth}", err=True)
    sys.stdout.flush()
    os.execv(sys.executable, bentoml_args(host, port))
