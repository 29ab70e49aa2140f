"""The ``backbones`` CLI end to end, in subprocesses, against a real registry in a temp BENTOML_HOME."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from .conftest import assert_clear_error

pytestmark = pytest.mark.slow


def _json_lines(text: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_help_explains_every_command(run_cli) -> None:  # type: ignore[no-untyped-def]
    top = run_cli("--help")
    assert top.returncode == 0
    for cmd in ("models", "export", "classify"):
        assert cmd in top.stdout
    for args in (["models", "--help"], ["export", "--help"], ["classify", "--help"], ["models", "alias", "--help"]):
        proc = run_cli(*args)
        assert proc.returncode == 0 and "Usage:" in proc.stdout


def test_catalog_json(run_cli) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("models", "catalog", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["efficientnet_lite0"]["offline"] is True
    assert rows["resnet50"]["preprocess"]["resize"] == 232
    assert rows["resnet50"]["cache"].endswith("resnet50-11ad3fa6.pth")


def test_export_list_show_alias_classify_delete(run_cli, image_files: list[Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = run_cli("export", "tiny_cnn")
    assert first.returncode == 0, first.stderr
    tag1 = first.stdout.strip()
    assert tag1.startswith("tiny_cnn:") and "verified on 8 images" in first.stderr
    tag2 = run_cli("export", "tiny_cnn", "--as", "tiny_copy").stdout.strip()
    assert tag2.startswith("tiny_copy:")

    listed = json.loads(run_cli("models", "list", "--json").stdout)
    assert {r["tag"] for r in listed} == {tag1, tag2}

    alias = run_cli("models", "alias", tag1, "production")
    assert alias.returncode == 0 and f"tiny_cnn@production -> {tag1}" in alias.stdout
    shown = json.loads(run_cli("models", "show", "tiny_cnn@production", "--json").stdout)
    assert shown["name"] == "tiny_cnn" and shown["aliases"] == {"production": tag1.split(":")[1]}
    assert shown["preprocess"]["crop"] == 64 and len(shown["labels"]) == 10
    assert shown["alias_history"][0]["alias"] == "production"
    assert "sha256" in run_cli("models", "show", tag1).stdout

    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    proc = run_cli("classify", "tiny_cnn", str(image_files[0]), str(bad), str(image_files[1]), "--json", "-k", "3")
    assert proc.returncode == 1  # something failed, and the exit code says so
    rows = _json_lines(proc.stdout)  # --json prints only JSON
    assert [Path(r["path"]).name for r in rows] == ["photo0.jpg", "notes.txt", "photo1.jpg"]
    assert rows[1]["error"] and "predictions" not in rows[1]
    for r in (rows[0], rows[2]):
        assert r["model"] == tag1
        assert len(r["predictions"]) == 3
        assert set(r["predictions"][0]) == {"index", "label", "score"}
        scores = [p["score"] for p in r["predictions"]]
        assert scores == sorted(scores, reverse=True)

    human = run_cli("classify", "tiny_cnn", str(image_files[0]), "-k", "1")
    assert human.returncode == 0 and tag1 in human.stdout

    refused = run_cli("models", "delete", tag1)
    assert refused.returncode == 1 and "alias production" in refused.stderr
    assert run_cli("models", "delete", tag2).returncode == 0
    assert {r["tag"] for r in json.loads(run_cli("models", "list", "--json").stdout)} == {tag1}


def test_a_catalog_name_is_exported_on_first_use(run_cli, image_files: list[Path]) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("classify", "tiny_cnn", str(image_files[0]), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "first use" in proc.stderr
    (row,) = _json_lines(proc.stdout)
    assert row["model"].startswith("tiny_cnn:")
    listed = json.loads(run_cli("models", "list", "--json").stdout)
    assert [r["tag"] for r in listed] == [row["model"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify", "no_such_model", "x.jpg"], "no registered model 'no_such_model'"),
        (["export", "resnet5"], "unknown model 'resnet5'; known: efficientnet_lite0"),
        (["models", "show", "../etc"], "invalid model name '../etc'"),
        (["models", "alias", "nothing", "production"], "no registered model 'nothing'"),
        (["models", "delete", "nothing"], "name a version to delete"),
    ],
)
def test_mistakes_get_one_clear_line_and_no_traceback(run_cli, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    assert_clear_error(run_cli(*args), message)


def test_bad_usage_exits_2(run_cli) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("classify", "tiny_cnn", "x.jpg", "--top-k", "0")
    assert proc.returncode == 2 and "top-k" in proc.stderr


# -- options and their defaults: each default is read from where it is defined ------------------


def _help(*args: str) -> str:
    """A command's --help, in process, with its line breaks folded."""
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_options_mapped_onto_settings_say_their_setting_and_its_default() -> None:
    from cli.common import SettingOption
    from cli.main import cli
    from models import Settings

    mapped = {}
    for path, command in _commands(cli):
        if path[0] in ("embed", "finetune"):  # their --workers are other things than serving workers
            continue
        for param in command.params:
            if param.name in Settings.model_fields:  # an option named like a setting must be that setting
                assert isinstance(param, SettingOption), (
                    f"{' '.join(path)} --{param.name} is not mapped onto its setting"
                )
            if isinstance(param, SettingOption):
                mapped[(path, param.setting)] = param
                assert param.default is None, path  # left out, the setting decides
    assert {key[1] for key in mapped} >= {"workers", "serve_models", "quantize_min_agreement"}
    for (path, field), param in mapped.items():
        info = Settings.model_fields[field]
        text = _help(*path)
        assert f"{Settings.env_name(field)}, else {info.default}" in text, (path, field)
        if param.help == info.description:
            assert " ".join(info.description.split()) in text


def test_serve_help_states_no_default_of_its_own() -> None:
    from models import Settings

    text = _help("serve")
    description = Settings.model_fields["workers"].description or ""
    assert " ".join(description.split()) in text and "serving_plan" in text  # what serving_plan does, in one place
    assert "BENTOML_PORT" in text  # the port is BentoML's to default
    assert "[default: 127.0.0.1]" in text  # the address is not: only this machine, unless --host says so
    assert "3000" not in text and "0.0.0.0" not in text


def test_defaults_of_classify_and_export_are_those_of_the_code_they_drive() -> None:
    from dataclasses import fields

    from cli.main import export_cmd
    from models.inference import DEFAULT_TOP_K
    from models.quantize import CALIBRATION_METHODS, QuantizeOptions

    assert f"--top-k INTEGER RANGE Classes per image. [default: {DEFAULT_TOP_K};" in _help("classify")
    text = _help("export")
    defaults = {f.name: f.default for f in fields(QuantizeOptions)}
    for option, field in (
        ("--calibration-method", "method"),
        ("--holdout-fraction", "holdout_fraction"),
        ("--float-first-convs", "float_first_convs"),
        ("--seed", "seed"),
    ):
        assert re.search(rf"{option} .*?\[default: {re.escape(str(defaults[field]))}[;\]]", text), option
    method = next(p for p in export_cmd.params if p.name == "calibration_method")
    assert tuple(method.type.choices) == CALIBRATION_METHODS  # type: ignore[attr-defined]


def test_serve_passes_the_address_on_only_when_given() -> None:
    from cli.serve import SERVICE, bentoml_args

    assert bentoml_args(None, None)[-2:] == ["serve", SERVICE]
    assert bentoml_args("127.0.0.1", 8080)[-4:] == ["--host", "127.0.0.1", "--port", "8080"]


def test_env_names_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import Settings

    assert Settings.env_name("workers") == "BACKBONES_WORKERS"
    assert Settings.env_name("bentoml_home") == "BENTOML_HOME"
    for name, value in Settings.env_for(workers=3, serve_models="a,b@x").items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.workers == 3 and settings.served_refs() == ["a", "b@x"]
