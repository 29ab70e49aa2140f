"""The ``backbones`` CLI end to end, in subprocesses, against a real registry in a temp BENTOML_HOME."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    proc = run_cli(*args)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_bad_usage_exits_2(run_cli) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("classify", "tiny_cnn", "x.jpg", "--top-k", "0")
    assert proc.returncode == 2 and "top-k" in proc.stderr
