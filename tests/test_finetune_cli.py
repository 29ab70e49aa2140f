"""``backbones finetune`` on the command line: the real CLI in subprocesses for the path a user
takes (fine-tune, then classify with the new version), click's runner for usage errors."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.finetune import finetune_cmd
from cli.main import cli
from finetune import FinetuneConfig
from tests.conftest import ROOT
from tests.test_finetune_support import color_image, json_lines, make_dataset


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """BENTOML_HOME for in-process CLI runs (the settings are read once per process: re-read them)."""
    from models import get_settings

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    get_settings.cache_clear()
    yield tmp_path / "bentoml"
    get_settings.cache_clear()


@pytest.mark.slow
def test_finetune_json_then_classify_with_the_new_version(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = make_dataset(tmp_path / "photos", {"blue": 10, "red": 10}, seed=31)
    proc = run_cli(
        "finetune", str(data), "--backbone", "tiny_cnn", "--name", "colors", "--json", "--seed", "4",
        "--promote-if-better", "production",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # nothing but the report on stdout
    tag = report["model"]
    assert tag.startswith("colors:") and report["split"]["seed"] == 4
    assert report["features"]["computed"] == 20 and report["metrics"]["accuracy"] >= 0.9
    assert report["promotion"]["promoted"] is True
    assert "features" in proc.stderr  # the progress bar, on stderr

    photos = [tmp_path / "red.jpg", tmp_path / "blue.jpg"]
    color_image("red", 800, seed=31).save(photos[0])
    color_image("blue", 801, seed=31).save(photos[1])
    classified = run_cli("classify", "colors", *map(str, photos), "--json", "-k", "2")
    assert classified.returncode == 0, classified.stderr
    rows = json_lines(classified.stdout)
    assert [r["model"] for r in rows] == [tag, tag]  # 'colors' resolves to its production alias
    assert [r["predictions"][0]["label"] for r in rows] == ["red", "blue"]
    assert {p["label"] for p in rows[0]["predictions"]} == {"blue", "red"}


def test_the_terminal_summary_and_show(home: Path, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "photos", {"blue": 8, "red": 8}, seed=32)
    runner = CliRunner()
    result = runner.invoke(
        cli, ["finetune", str(data), "--backbone", "tiny_cnn", "--name", "colors", "--promote-if-better", "staging"]
    )
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    tag = out[-1]
    assert tag.startswith("colors:")
    assert out[0].startswith(f"{tag}  (linear on tiny_cnn:") and "12 train / 4 val images, 2 classes" in out[0]
    assert any(line.strip().startswith("val accuracy") for line in out)
    assert any(line.strip().startswith("red ") for line in out)  # per-class table
    assert any(line.strip().startswith("features  16 computed") for line in out)
    assert any(line.startswith("  probe  weight decay") and "cross-validation" in line for line in out)
    assert any(line.startswith("  report  ") and line.endswith("report.html") for line in out)
    assert any(line.startswith(f"promotion: colors@staging -> {tag}: colors@staging did not exist yet") for line in out)
    shown = runner.invoke(cli, ["models", "show", "colors"])
    assert shown.exit_code == 0 and '"accuracy":' in shown.stdout and "report.json" in shown.stdout

    one = make_dataset(tmp_path / "one", {"red": 4}, seed=33)
    bad = runner.invoke(cli, ["finetune", str(one), "--backbone", "tiny_cnn", "--name", "x"])
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines() == [
        f"fine-tuning tiny_cnn on {one} (linear) ...",
        f"error: training data: fine-tuning needs at least two classes, found 1 ('red') in {one.resolve()}; "
        "an ImageFolder holds one sub-folder per class",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--val-dir", "{data}", "--val-fraction", "0.3"], "not both"),
        (["--epochs", "3"], "--epochs applies to --mode full only"),
        (["--resume"], "--resume applies to --mode full only"),
        # typed, even at the config's own value, is typed
        (["--warmup-epochs", "1"], "--warmup-epochs applies to --mode full only"),
        (["--nproc-per-node", "2"], "--nproc-per-node applies to --mode full only"),
        (["--val-fraction", "1.5"], "1.5 is not in the range"),
        (["--mode", "fast"], "'fast' is not one of"),
        (["--mode", "full", "--views", "flip"], "--views applies to --mode linear only"),
        (["--views", "mirror"], "'mirror' is not one of"),
        (["--gate-min-images", "10"], "--gate-min-images applies with --promote-if-better only"),
        (["--force-promotion"], "--force-promotion applies with --promote-if-better only"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    data = make_dataset(tmp_path / "photos", {"blue": 2, "red": 2})
    argv = ["finetune", str(data), "--backbone", "tiny_cnn", "--name", "x", *(a.format(data=data) for a in args)]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2
    assert message in result.output


def test_several_backbones_with_the_full_fine_tune_is_one_line(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "photos", {"blue": 2, "red": 2})
    argv = ["finetune", str(data), "--backbone", "auto", "--name", "x", "--mode", "full"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: --backbone 'auto' compares several backbones, which the linear probe alone does; "
        "give one backbone with --mode full"
    )


def test_a_bad_name_is_one_line_before_any_work(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "photos", {"blue": 2, "red": 2})
    result = CliRunner().invoke(cli, ["finetune", str(data), "--backbone", "tiny_cnn", "--name", "Bad Name"])
    assert result.exit_code == 1
    assert "error: invalid model name 'Bad Name'" in result.output


NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e-?\d+)?")


def test_every_config_option_takes_its_default_limits_and_help_from_the_config() -> None:
    """FinetuneConfig is the one place the defaults live: an option of a config field whose default,
    help or shown default states a number of its own (a default typed into the CLI again) fails."""
    options = {p.name: p for p in finetune_cmd.params if isinstance(p, click.Option)}
    fields = {k: f for k, f in FinetuneConfig.model_fields.items() if k != "data"}
    assert set(fields) <= set(options)
    ctx = click.Context(finetune_cmd)
    for name, field in fields.items():
        option = options[name]
        assert option.help == field.description, name
        if field.is_required():
            assert option.required, name
            continue
        assert option.default == field.default, name
        record = option.get_help_record(ctx)
        assert record is not None
        help_text = record[1]
        if field.default is not None and field.annotation is not bool:
            assert f"default: {field.default}" in help_text, name
        own = f"{field.description} {field.default} {' '.join(map(str, field.metadata))}"
        assert set(NUMBER.findall(help_text)) <= set(NUMBER.findall(own)), (name, help_text)


def test_no_option_of_a_config_field_is_declared_by_hand() -> None:
    source = ROOT / "cli" / "finetune.py"
    flags = {"--" + k.replace("_", "-") for k in FinetuneConfig.model_fields}
    typed = [
        node.args[0].value
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "option"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]
    assert "--nproc-per-node" in typed  # the check sees the options that are declared by hand
    assert not flags & {str(t).split("/")[0] for t in typed}


def test_the_cli_does_not_import_torch_to_build_its_options() -> None:
    code = "import sys, cli.main; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
