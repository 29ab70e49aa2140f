"""What every ``backbones`` command shares: error handling, JSON output, image paths, the registry."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from models import Registry

F = TypeVar("F", bound=Callable[..., Any])

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".mpo"})


def open_registry() -> Registry:
    from models import Registry

    return Registry()


def handle_errors(fn: F) -> F:
    """Turn the project's own errors into one line on stderr and exit code 1 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from models import BackbonesError

        try:
            return fn(*args, **kwargs)
        except BackbonesError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def echo_json(obj: Any) -> None:
    """One line of JSON on stdout."""
    click.echo(json.dumps(obj, default=str))


def image_paths(inputs: Sequence[str]) -> Iterator[Path]:
    """Files as given; folders searched recursively for image files, in sorted order."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p
