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

    problems = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        env = Settings.env_name(field) if field in Settings.model_fields else field
        problems.append(f"{env}={item.get('input')!r}: {item['msg'].lower()}")
    return f"bad setting {'; '.join(problems)} (see the README's Configuration table)"


class SettingOption(click.Option):
    """An option mapped onto a setting (``setting=`` its field): left out, the setting decides (its
    environment variable, else its default). The help is the setting's description unless given,
    and the default shown is read from the setting, so neither is written twice."""

    def __init__(self, *args: Any, setting: str, **kwargs: Any) -> None:
        from models.settings import Settings

        info = Settings.model_fields[setting]
        kwargs.setdefault("help", info.description)
        kwargs.update(default=None, show_default=f"{Settings.env_name(setting)}, else {info.default}")
        super().__init__(*args, **kwargs)
        self.setting = setting


class Deferred:
    """An option's default read from where it is defined, only when needed: when the option is left
    out, or when ``--help`` shows it (click prints ``str()`` of a default that is not a function).
    For defaults whose home is costly to import (PyTorch) on every start of the CLI."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read

    def __call__(self) -> Any:
        return self._read()

    def __str__(self) -> str:
        return str(self._read())


def echo_json(obj: Any) -> None:
    """One line of JSON on stdout."""
    click.echo(json.dumps(obj, default=str))
