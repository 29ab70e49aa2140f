"""The HTML report of a fine-tuned version: one self-contained page with every misclassified
validation image, labels escaped (they are folder names), found by ``backbones models show`` and
kept out of the version (and so out of ``/models``)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from finetune import finetune
from finetune.report_html import THUMBNAIL_SIDE, html_report_path
from models import Registry
from models.export import export_catalog
from models.spec import SPEC_FILENAME
from tests.test_finetune_support import color_image, config

SCRIPT, AMP = "<script>", "b&b"  # class names a browser would read as markup


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    r = Registry(tmp_path_factory.mktemp("html") / "bentoml")
    export_catalog("tiny_cnn", registry=r)
    return r


def _folder(root: Path, content: dict[str, list[tuple[str, int]]]) -> Path:
    """An ImageFolder whose class folders hold photos of the given colours."""
    for label, photos in content.items():
        (root / label).mkdir(parents=True)
        for colour, i in photos:
            color_image(colour, i, seed=61).save(root / label / f"{colour}_{i:03d}.jpg")
    return root


def test_the_html_report_shows_every_misclassified_image_with_escaped_labels(reg: Registry, tmp_path: Path) -> None:
    train = _folder(
        tmp_path / "train",
        {SCRIPT: [("red", i) for i in range(12)], AMP: [("blue", i) for i in range(12)]},
    )
    # validation photos filed under the wrong class are what the probe gets "wrong"
    val = _folder(
        tmp_path / "val",
        {
            SCRIPT: [("red", 100), ("red", 101), ("red", 102), ("blue", 103), ("blue", 104)],
            AMP: [("blue", 105), ("blue", 106), ("blue", 107), ("red", 108)],
        },
    )
    result = finetune(config(train, "pages", val_dir=val), registry=reg)
    stored, report = result.stored, result.report
    assert stored is not None
    path = html_report_path(reg, stored.spec.name, stored.spec.version)
    assert report["report_html"] == str(path) and path.is_file()
    page = path.read_text(encoding="utf-8")

    matrix = report["metrics"]["confusion"]["matrix"]
    wrong = sum(matrix[i][j] for i in range(2) for j in range(2) if i != j)
    assert wrong == 3  # the three photos filed under the other colour's class
    figures = re.findall(r"<figure>.*?</figure>", page)
    assert len(figures) == wrong
    for rel in (f"{SCRIPT}/blue_103.jpg", f"{SCRIPT}/blue_104.jpg", f"{AMP}/red_108.jpg"):
        escaped = rel.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        (figure,) = [f for f in figures if escaped in f]
        true = SCRIPT if rel.startswith(SCRIPT) else AMP
        other = AMP if true == SCRIPT else SCRIPT
        assert f"true <b>{_escaped(true)}</b>" in figure and f"predicted <b>{_escaped(other)}</b>" in figure
        data = re.search(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', figure)
        assert data is not None
        with Image.open(io.BytesIO(base64.b64decode(data.group(1)))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= THUMBNAIL_SIDE

    # the folder names are text on the page, never markup; nothing is loaded from elsewhere
    assert "<script" not in page.lower() and "&lt;script&gt;" in page and "b&amp;b" in page
    assert "http://" not in page and "https://" not in page
    for section in ("Per class", "Confusion matrix", "How it was trained", "Misclassified validation images (3)"):
        assert section in page
    assert report["recipe"]["why"].split(":")[0] in page  # what the probe chose, and why

    # the page holds photos: it lives beside the run, not in the version that is pushed and served
    assert stored.path not in path.parents and path.name not in stored.spec.files
    assert str(path) not in (stored.path / SPEC_FILENAME).read_text()


def _escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_models_show_says_where_the_html_report_is(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import cli
    from models import get_settings

    train = _folder(
        tmp_path / "train", {"blue": [("blue", i) for i in range(6)], "red": [("red", i) for i in range(6)]}
    )
    stored = finetune(config(train, "shown"), registry=reg).stored
    assert stored is not None
    path = html_report_path(reg, "shown", stored.spec.version)
    monkeypatch.setenv("BENTOML_HOME", str(reg.home))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        shown = runner.invoke(cli, ["models", "show", stored.tag])
        as_json = runner.invoke(cli, ["models", "show", stored.tag, "--json"])
        exported = runner.invoke(cli, ["models", "show", "tiny_cnn", "--json"])
    finally:
        get_settings.cache_clear()
    assert shown.exit_code == 0 and f"  report       {path}" in shown.stdout.splitlines()
    assert json.loads(as_json.stdout)["report_html"] == str(path)
    assert json.loads(exported.stdout)["report_html"] is None  # an export has no such report
