"""``backbones models push | pull``, and ``--registry`` for ``models list | show | alias | delete``:
a registry in object storage (``s3://bucket/prefix``, ``file:///path``...), by default the one
``BACKBONES_REGISTRY_URL`` names. Credentials come from the AWS environment, profiles or roles."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from .common import SettingOption, echo_json, handle_errors, open_registry

if TYPE_CHECKING:
    from models import Registry, StoredVersion
    from models.remote import RemoteRegistry
    from models.transfer import Progress

registry_option = click.option("--registry", "registry_url", cls=SettingOption, setting="registry_url", metavar="URL")


def registry_for(url: str | None) -> Registry | RemoteRegistry:
    """The remote registry ``url`` (or ``BACKBONES_REGISTRY_URL``) names, else the local store."""
    from models import get_settings

    chosen = url if url is not None else get_settings().registry_url
    if not chosen:
        return open_registry()
    from models.remote import RemoteRegistry

    return RemoteRegistry(chosen)


def check_remote(url: str | None) -> None:
    """Open the remote registry a command will publish to, if there is one, before any work: a bad
    URL or missing credentials fail at once, not after an export or a training run."""
    from models import get_settings
    from models.remote import RemoteRegistry

    chosen = url if url is not None else get_settings().registry_url
    if chosen:
        RemoteRegistry(chosen)


def publish(stored: StoredVersion, url: str | None, *, quiet: bool) -> None:
    """Push a version just registered in the local store to the remote registry, when there is one
    (``url``, else ``BACKBONES_REGISTRY_URL``): `export`, conversions and `finetune` publish this way."""
    from models import BackbonesError, get_settings
    from models.remote import RemoteRegistry

    chosen = url if url is not None else get_settings().registry_url
    if not chosen:
        return
    remote = RemoteRegistry(chosen)
    try:
        pushed = remote.push(open_registry(), stored.tag, progress=_progress())
    except BackbonesError as e:
        raise type(e)(
            f"{stored.tag} is registered in the local store but was not published to {remote.url}: {e}"
        ) from None
    if not quiet:
        click.echo(f"published to {remote.url}: {pushed.tag}", err=True)


def local_version(ref: str, url: str | None) -> StoredVersion:
    """The version ``ref`` names in the local store: exported on first use for a catalog name, or
    pulled from the remote registry (``url``, else ``BACKBONES_REGISTRY_URL``) when only it has it."""
    from models import UnknownModelError, get_settings
    from models.export import ensure_version
    from models.remote import RemoteRegistry

    local = open_registry()
    try:
        return ensure_version(ref, local)
    except UnknownModelError:
        chosen = url if url is not None else get_settings().registry_url
        if not chosen:
            raise
        return RemoteRegistry(chosen).pull(ref, local, progress=_progress())


def _remote(url: str | None) -> RemoteRegistry:
    from models import RegistryError, get_settings
    from models.remote import RemoteRegistry

    chosen = url or get_settings().registry_url
    if not chosen:
        raise RegistryError("no remote registry: pass --registry s3://bucket/prefix or set BACKBONES_REGISTRY_URL")
    return RemoteRegistry(chosen)


def _progress() -> Progress | None:
    """A progress bar per file on stderr, when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None
    from fsspec.callbacks import TqdmCallback

    def bar(label: str, size: int) -> Any:
        kwargs = {"desc": label, "unit": "B", "unit_scale": True, "unit_divisor": 1024, "file": sys.stderr}
        return TqdmCallback(tqdm_kwargs={**kwargs, "leave": False})

    return bar


@click.command("push")
@click.argument("ref")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def push_cmd(ref: str, registry_url: str | None, as_json: bool) -> None:
    """Copy version REF from the local store to the remote registry, same name and version.

    The local files are checked first. The version appears in the remote only once all its files
    are uploaded and checked; a push killed half-way leaves nothing visible (the next push cleans
    up). A version the remote already holds is not uploaded again. Prints NAME:VERSION.
    """
    remote = _remote(registry_url)
    pushed = remote.push(open_registry(), ref, progress=_progress())
    if as_json:
        echo_json({"tag": pushed.tag, "registry": remote.url, "uploaded": pushed.uploaded, "bytes": pushed.sent})
        return
    click.echo(f"{'pushed' if pushed.uploaded else 'already'} in {remote.url}: {pushed.tag}", err=True)
    click.echo(pushed.tag)


@click.command("pull")
@click.argument("ref")
@registry_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def pull_cmd(ref: str, registry_url: str | None, as_json: bool) -> None:
    """Copy version REF (NAME, NAME:VERSION or NAME@ALIAS, resolved in the remote registry) into
    the local store, same name and version.

    Every file is checked against the sha256 in its spec before the version is registered; a
    version already in the local store (checked, identical) is not downloaded again. Prints
    NAME:VERSION.
    """
    from models.registry import Ref

    remote, local = _remote(registry_url), open_registry()
    had = {s.version for s in local.versions(Ref.parse(ref).name)}
    stored = remote.pull(ref, local, progress=_progress())
    downloaded = stored.spec.version not in had
    if as_json:
        echo_json({"tag": stored.tag, "registry": remote.url, "downloaded": downloaded, "path": str(stored.path)})
        return
    click.echo(f"{'pulled from' if downloaded else 'already pulled from'} {remote.url}: {stored.tag}", err=True)
    click.echo(stored.tag)


def add_remote_commands(group: click.Group) -> None:
    group.add_command(push_cmd)
    group.add_command(pull_cmd)
