"""The real BentoML server, started on a free local port, against a real registry."""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from models import InferenceModel, Registry
from models.export import export_catalog
from models.runtime import CPU, CUDA, TRT, on_gpu, usable_providers
from models.samples import synthetic_image

from .conftest import jpeg_bytes, registry_with, shared_data
from .serving import Server, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("serve") / "bentoml"
    reg = Registry(home)
    first = export_catalog("tiny_cnn", registry=reg)
    reg.set_alias(first.tag, "production")
    export_catalog("efficientnet_lite0", registry=reg)
    srv = start_server(
        home, ["tiny_cnn@production", "efficientnet_lite0"], tmp_path_factory.mktemp("log") / "server.log"
    )
    yield srv
    stop_server(srv)


def test_probes_and_models(server: Server) -> None:
    assert httpx.get(server.url + "/livez").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    doc = httpx.get(server.url + "/models").json()
    assert doc["ready"] is True
    by_name = {m["name"]: m for m in doc["models"]}
    tiny = by_name["tiny_cnn"]
    assert tiny["tag"] == f"tiny_cnn:{tiny['version']}" and tiny["aliases"]["production"] == tiny["version"]
    # CPU here; the GPU provider first where one can run (a GPU machine)
    first = next((p for p in (TRT, CUDA) if p in usable_providers()), CPU)
    assert tiny["spec"]["preprocess"]["crop"] == 64 and tiny["providers"][0] == first
    assert tiny["providers"][-1] == CPU
    assert by_name["efficientnet_lite0"]["spec"]["feature_dim"] == 1280
    openapi = httpx.get(server.url + "/docs.json").json()
    assert {"/classify", "/embed", "/models", "/readyz", "/livez", "/metrics"} <= set(openapi["paths"])


def test_classify_and_embed_match_in_process_results(server: Server) -> None:
    try:
        photos = sorted(shared_data("imagenet-sample").iterdir())[:5]
        payloads = [p.read_bytes() for p in photos]
    except pytest.skip.Exception:
        payloads = [jpeg_bytes(i) for i in range(5)]
    local = InferenceModel.load("efficientnet_lite0", registry=server.registry)
    # on a GPU, FP32 convolutions use TF32 tensor cores (cuda_tf32) and different batch sizes
    # different kernels: the numbers agree to ~1e-3 there, to float rounding on a CPU
    tol = 5e-3 if on_gpu() else 1e-4
    expected = local.classify(payloads, k=3)
    vectors = local.embed(payloads)
    for data, preds, vector in zip(payloads, expected, vectors, strict=True):
        r = server.post("/classify", data, model="efficientnet_lite0", top_k="3")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == local.tag
        assert [p["index"] for p in body["predictions"]] == [p.index for p in preds]
        assert body["predictions"][0]["score"] == pytest.approx(preds[0].score, abs=tol)
        e = server.post("/embed", data, model="efficientnet_lite0").json()
        assert e["model"] == local.tag and e["dim"] == 1280
        np.testing.assert_allclose(np.asarray(e["embedding"], np.float32), vector, atol=tol)
    # no model field: the first served model answers
    assert server.post("/classify", payloads[0]).json()["model"].startswith("tiny_cnn:")


def test_300_requests_at_32_clients_all_succeed(server: Server) -> None:
    images = [jpeg_bytes(i) for i in range(12)]
    local = InferenceModel(server.registry.get("tiny_cnn@production"))
    expected = [p[0].index for p in local.classify(images, k=1)]

    def one(i: int) -> tuple[int, int, int]:
        r = server.post("/classify", images[i % len(images)], model="tiny_cnn", top_k="1")
        return i, r.status_code, r.json()["predictions"][0]["index"] if r.status_code == 200 else -1

    before = server.metric("backbones_batch_size_count", model="tiny_cnn")
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(300)))
    assert [s for _, s, _ in results] == [200] * 300
    assert all(idx == expected[i % len(images)] for i, _, idx in results)
    batches = server.metric("backbones_batch_size_count", model="tiny_cnn") - before
    assert 0 < batches < 300  # concurrent requests were batched together


def _image_bytes(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    import struct
    import zlib

    data = bytearray(_image_bytes(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


BAD_REQUESTS = [
    ("non-image bytes", dict(image=b"hello, not an image"), 400),
    ("empty file", dict(image=b""), 400),
    ("truncated JPEG", dict(image=jpeg_bytes(0)[:2000]), 400),
    ("30000x30000 PNG", dict(image=_png_declaring(30000, 30000)), 413),
    ("30 MB body", dict(image=b"\xff" * (30 * 1024 * 1024)), 413),
    ("unknown model", dict(image=jpeg_bytes(0), model="no_such_model"), 404),
    ("top_k 0", dict(image=jpeg_bytes(0), top_k="0"), 422),
    ("top_k huge", dict(image=jpeg_bytes(0), top_k="1000000"), 422),
    ("top_k not a number", dict(image=jpeg_bytes(0), top_k="five"), 422),
    ("unsupported format", dict(image=_image_bytes(Image.new("RGB", (16, 16)), "ICO")), 415),
]


@pytest.mark.parametrize(("case", "request_kwargs", "status"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_inputs_get_the_right_status_and_a_json_error(
    server: Server, case: str, request_kwargs: dict, status: int
) -> None:  # type: ignore[type-arg]
    kwargs = dict(request_kwargs)
    r = server.post("/classify", kwargs.pop("image"), **kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert server.post("/classify", jpeg_bytes(1)).status_code == 200  # still answering


def test_malformed_requests(server: Server) -> None:
    cases = [
        (httpx.post(server.url + "/classify", data={"model": "tiny_cnn"}), 422, "missing file field 'image'"),
        (httpx.post(server.url + "/classify", files={"img": ("a.jpg", jpeg_bytes(0))}), 422, "got fields: img"),
        (httpx.post(server.url + "/classify", json={"image": "aGVsbG8="}), 415, "multipart/form-data"),
        (
            httpx.post(
                server.url + "/classify",
                content=b"\x80\x04K\x01.",
                headers={"content-type": "application/vnd.bentoml+pickle"},
            ),
            415,
            None,
        ),
        (httpx.post(server.url + "/classify", data={"image": "http://127.0.0.1:9/cat.jpg"}), 422, "never fetched"),
        (httpx.get(server.url + "/classify"), 405, None),
        (httpx.get(server.url + "/embed"), 405, None),
    ]
    for r, status, message in cases:
        assert r.status_code == status, r.text
        assert "error" in r.json()
        if message:
            assert message in r.json()["error"]
    assert server.post("/embed", jpeg_bytes(2)).status_code == 200


def test_every_image_mode_is_answered_like_the_upright_rgb_image(server: Server) -> None:
    base = synthetic_image(5, (320, 240))
    local = InferenceModel(server.registry.get("efficientnet_lite0"))
    stored_sideways = base.rotate(90, expand=True)  # EXIF orientation 6: "turn 90 degrees clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [base.convert("P"), Image.new("P", base.size, 3)]
    uploads = {
        "cmyk": _image_bytes(base.convert("CMYK"), "JPEG", quality=98),
        "16-bit": _image_bytes(Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257), "PNG"),
        "palette+alpha": _image_bytes(base.convert("RGBA").convert("P"), "PNG", transparency=0),
        "animated gif": _image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "exif-rotated": _image_bytes(stored_sideways, "JPEG", quality=98, exif=exif.tobytes()),
    }
    for name, data in uploads.items():
        r = server.post("/classify", data, model="efficientnet_lite0", top_k="1")
        assert r.status_code == 200, (name, r.text)
        expected = local.classify([data], k=1)[0][0].index
        assert r.json()["predictions"][0]["index"] == expected, name
    # the EXIF-rotated upload is read upright: its vector is the upright photo's, not the sideways one's
    served = np.asarray(server.post("/embed", uploads["exif-rotated"], model="efficientnet_lite0").json()["embedding"])
    upright = local.embed([_image_bytes(base, "JPEG", quality=98)])[0]
    sideways = local.embed([_image_bytes(stored_sideways, "JPEG", quality=98)])[0]

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cos(served, upright) > 0.98
    assert cos(served, upright) > cos(served, sideways) + 0.02


def test_metrics_are_exported_and_move(server: Server) -> None:
    before = server.metric("backbones_requests_total", endpoint="embed", model="tiny_cnn", outcome="ok")
    for i in range(3):
        assert server.post("/embed", jpeg_bytes(i), model="tiny_cnn").status_code == 200
    after = server.metric("backbones_requests_total", endpoint="embed", model="tiny_cnn", outcome="ok")
    assert after - before == 3
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "backbones_decode_seconds_bucket",
        "backbones_queue_wait_seconds_bucket",
        "backbones_inference_seconds_bucket",
        "backbones_batch_size_bucket",
        "backbones_top1_confidence_bucket",
        "backbones_model_loaded",
        "backbones_requests_total",
    ):
        assert name in text, name
    assert re.search(r'backbones_model_loaded\{model="tiny_cnn",version="\w+"\} 1\.0', text)


def test_hot_swap_under_load_then_a_failed_swap_keeps_the_old_version(server: Server) -> None:
    reg = server.registry
    old_tag = reg.get("tiny_cnn@production").tag
    new = export_catalog("tiny_cnn", registry=reg)
    stop = threading.Event()
    seen: list[tuple[int, str]] = []

    def hammer() -> None:
        i = 0
        while not stop.is_set():
            r = server.post("/classify", jpeg_bytes(i % 4), model="tiny_cnn", top_k="2")
            seen.append((r.status_code, r.json().get("model", r.text)))
            i += 1

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    reg.set_alias(new.tag, "production")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(tag == new.tag for _, tag in seen[-8:]):
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    assert {s for s, _ in seen} == {200}, [x for x in seen if x[0] != 200][:3]
    tags = [tag for _, tag in seen]
    assert old_tag in tags and new.tag in tags
    assert tags[-1] == new.tag
    assert server.metric("backbones_model_swaps_total", model="tiny_cnn", outcome="ok") >= 1

    # a version whose file changed after registration fails its checksum: the old one keeps serving
    broken = export_catalog("tiny_cnn", registry=reg)
    onnx_path = broken.path / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10] + b"0123456789")
    failed_before = server.metric("backbones_model_swaps_total", model="tiny_cnn", outcome="failed")
    reg.set_alias(broken.tag, "production")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tiny = next(m for m in httpx.get(server.url + "/models").json()["models"] if m["name"] == "tiny_cnn")
        if tiny["last_error"]:
            break
        time.sleep(0.2)
    assert "modified after registration" in tiny["last_error"]
    assert tiny["tag"] == new.tag
    assert server.post("/classify", jpeg_bytes(0), model="tiny_cnn").json()["model"] == new.tag
    assert server.metric("backbones_model_swaps_total", model="tiny_cnn", outcome="failed") > failed_before
    assert "refusing to load" in server.log.read_text()


def test_no_access_log_line_per_request_unless_asked(server: Server, tmp_path: Path) -> None:
    """BACKBONES_ACCESS_LOG is off by default: requests are counted in /metrics, not logged."""
    assert server.post("/classify", jpeg_bytes(3)).status_code == 200
    assert "path=/classify" not in server.log.read_text()

    home = registry_with(tmp_path / "bentoml", "tiny_cnn").home
    logged = start_server(
        home, ["tiny_cnn"], tmp_path / "server.log", BACKBONES_ACCESS_LOG="true", BACKBONES_WORKERS="1"
    )
    try:
        assert logged.post("/classify", jpeg_bytes(3)).status_code == 200
        deadline = time.monotonic() + 10
        while "path=/classify" not in logged.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "path=/classify" in logged.log.read_text()
    finally:
        stop_server(logged)


def test_image_routes_are_left_out_of_tracing_unless_asked(tmp_path: Path) -> None:
    """BentoML's tracing middleware costs ~0.35 ms of CPU per request even with nothing sampled:
    /classify and /embed skip it unless BACKBONES_TRACE_REQUESTS is on. The service is declared
    with that config (read in a fresh interpreter, where the settings come from the environment)."""
    import json
    import os
    import subprocess
    import sys

    from opentelemetry.util.http import ExcludeList

    from models import Settings
    from service.bento import tracing_config

    excluded = ExcludeList(tracing_config(Settings())["excluded_urls"])
    assert excluded.url_disabled("http://127.0.0.1:3000/classify")
    assert excluded.url_disabled("http://127.0.0.1:3000/embed?x=1")
    assert not excluded.url_disabled("http://127.0.0.1:3000/models")
    assert not excluded.url_disabled("http://127.0.0.1:3000/classify-all")
    assert tracing_config(Settings(trace_requests=True)) == {}

    code = "import json, service.bento as b; print(json.dumps(b.Backbones.config.get('tracing', {})))"
    for value, expect_excluded in (("false", True), ("true", False)):
        env = {**os.environ, "BACKBONES_TRACE_REQUESTS": value, "BENTOML_HOME": str(tmp_path / "bentoml")}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert bool(json.loads(out.stdout.strip().splitlines()[-1]).get("excluded_urls")) == expect_excluded
