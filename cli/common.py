"""What every ``backbones`` command shares: error handling, JSON output, the registry."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from pydantic import ValidationError

    from models import Registry

F = TypeVar("F", bound=Callable[..., Any])


def open_registry() -> Registry:
    from models import Registry

    return Registry()


def handle_errors(fn: F) -> F:
    """Turn the project's own errors into one line on stderr and exit code 1 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        from models import BackbonesError, Settings

        try:
            return fn(*args, **kwargs)
        except BackbonesError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except ValidationError as e:
            if e.title != Settings.__name__:
                raise
            click.echo(f"error: {settings_problem(e)}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def settings_problem(error: ValidationError) -> str:
    """One line naming each bad environment variable, its value and what it must be."""
    from models import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    problems = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        info = Settings.model_fields.get(field)
        alias = info.validation_alias if info is not None else None
        env = alias if isinstance(alias, str) else f"{prefix}{field}".upper() if info is not None else field
        problems.append(f"{env}={item.get('input')!r}: {item['msg'].lower()}")
    return f"bad setting {'; '.join(problems)} (see the README's Configuration table)"


def echo_json(obj: Any) -> None:
    """One line of JSON on stdout."""
    click.echo(json.dumps(obj, default=str))
