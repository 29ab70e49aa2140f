"""The Open Inference Protocol (KServe v2) routes, with the real client (tritonclient) against the
real server on a free port, and the body codec against tritonclient's own encoder and parser."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from PIL import Image
from tritonclient.utils import InferenceServerException

from models import InferenceModel, Registry, StoredVersion
from models.export import export_catalog
from service.oip_codec import (
    CodecError,
    InputTensor,
    OutputTensor,
    byte_elements,
    decompress,
    encode_response,
    fp32_array,
    parse_request,
)

from .conftest import ROOT, jpeg_bytes
from .oip_helpers import binary_body, bytes_tensor, image_bytes, image_request, infer_url, png_declaring, post
from .serving import Server, start_server, stop_server

QUEUE_LIMIT = 8  # the server's admission places per model: also the most images one request may carry


# -- the codec, against tritonclient's encoder and parser ----------------------------------------


def triton_body(inputs: list[triton.InferInput], **kw: Any) -> tuple[bytes, str | None]:
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, **kw)
    return body, None if json_size is None else str(json_size)


def test_requests_tritonclient_encodes_are_read_back_exactly() -> None:
    images = [jpeg_bytes(0), b"", jpeg_bytes(1)]
    pixels = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    for binary in (True, False):
        a = triton.InferInput("image", [3], "BYTES")
        a.set_data_from_numpy(
            np.array(images if binary else [base64.b64encode(x).decode() for x in images], dtype=object),
            binary_data=binary,
        )
        outputs = [triton.InferRequestedOutput("logits", binary_data=binary, class_count=2)]
        request = parse_request(*triton_body([a], outputs=outputs, request_id="r1"))
        assert request.id == "r1" and len(request.inputs) == 1
        assert byte_elements(request.inputs[0]) == images
        (out,) = request.outputs or []
        assert (out.name, out.binary, out.classification) == ("logits", binary, 2)

        b = triton.InferInput("input", list(pixels.shape), "FP32")
        b.set_data_from_numpy(pixels, binary_data=binary)
        request = parse_request(*triton_body([b]))
        np.testing.assert_array_equal(fp32_array(request.inputs[0]), pixels)
        assert request.outputs is None and request.binary_output  # no outputs named: all, in binary


def test_responses_are_read_by_tritonclient_as_written() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    labels = ["0.5:1:a", "0.25:0:b"]
    for binary in (True, False):
        outputs = [
            OutputTensor("logits", "FP32", [2, 3], logits, binary),
            OutputTensor("logits_top", "BYTES", [2, 1], labels, not binary),
        ]
        body, header_length = encode_response("m", "v1", "req-7", outputs)
        result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
        np.testing.assert_array_equal(result.as_numpy("logits"), logits)
        assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("logits_top").ravel()] == labels
        doc = result.get_response()
        assert (doc["model_name"], doc["model_version"], doc["id"]) == ("m", "v1", "req-7")


def _binary_image(items_raw: bytes, shape: list[int], declared: int | None = None) -> tuple[bytes, str]:
    size = len(items_raw) if declared is None else declared
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": size}}]}
    body, headers = binary_body(doc, items_raw)
    return body, headers["Inference-Header-Content-Length"]


def _json(doc: Any) -> tuple[bytes, None]:
    return json.dumps(doc).encode(), None


def _tensor(data: Any, shape: list[int], name: str = "x", datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


MALFORMED = [
    ("not JSON", (b"{inputs: [", None), 400),
    ("invalid UTF-8", (b'{"inputs": "\xff"}', None), 400),
    ("JSON nested 100000 deep", (b"[" * 100_000 + b"]" * 100_000, None), 400),
    ("header length over the body", (b"{}", "3"), 400),
    ("negative header length", (b"{}", "-1"), 400),
    ("header length not a number", (b"{}", "twelve"), 400),
    ("header length with a sign", (b"{}", "+2"), 400),
    ("binary sizes short of the section", _binary_image(bytes_tensor([b"ab"]), [1], declared=3), 400),
    ("binary sizes beyond the section", _binary_image(bytes_tensor([b"ab"]), [1], declared=99), 400),
    (
        "binary size without the header length",
        _json(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4}}]}
        ),
        400,
    ),
    ("a JSON array", _json([]), 422),
    ("no inputs", _json({"inputs": []}), 422),
    (
        "data and binary_data_size",
        _json({"inputs": [{**_tensor([1], [1])["inputs"][0], "parameters": {"binary_data_size": 0}}]}),
        422,
    ),
    ("neither data nor binary_data_size", _json({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}), 422),
    ("negative shape", _json(_tensor([1], [-1])), 422),
    ("boolean in the shape", _json(_tensor([1], [True])), 422),
    ("a shape of 9 dimensions", _json(_tensor([1], [1] * 9)), 422),
    ("id not a string", _json({"id": 5, **_tensor([1], [1])}), 422),
    (
        "binary_data_output not a boolean",
        _json({"parameters": {"binary_data_output": "yes"}, **_tensor([1], [1])}),
        422,
    ),
    ("an output named twice", _json({"outputs": [{"name": "a"}, {"name": "a"}], **_tensor([1], [1])}), 422),
    (
        "classification true",
        _json({"outputs": [{"name": "a", "parameters": {"classification": True}}], **_tensor([1], [1])}),
        422,
    ),
    ("an input named twice", _json({"inputs": [_tensor([1], [1])["inputs"][0]] * 2}), 422),
]


@pytest.mark.parametrize(("case", "body", "status"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_are_refused_with_a_status(case: str, body: tuple[bytes, str | None], status: int) -> None:
    with pytest.raises(CodecError) as e:
        parse_request(*body)
    assert e.value.status == status and e.value.message


BAD_TENSORS = [
    ("bytes: a length prefix beyond the data", InputTensor("image", "BYTES", (1,), raw=b"\x10\x00\x00\x00ab"), 400),
    ("bytes: a truncated length prefix", InputTensor("image", "BYTES", (2,), raw=bytes_tensor([b"a"]) + b"\x01"), 400),
    ("bytes: more elements than the shape", InputTensor("image", "BYTES", (1,), raw=bytes_tensor([b"a", b"b"])), 400),
    ("bytes: fewer elements than the shape", InputTensor("image", "BYTES", (3,), raw=bytes_tensor([b"a"])), 400),
    ("bytes: JSON not base64", InputTensor("image", "BYTES", (1,), data=["not base64!"]), 422),
    ("bytes: JSON numbers", InputTensor("image", "BYTES", (1,), data=[7]), 422),
    ("bytes: JSON nested wrongly", InputTensor("image", "BYTES", (2, 1), data=[["YQ=="], "YQ=="]), 422),
    ("bytes: JSON nested too deep", InputTensor("image", "BYTES", (1,), data=[["YQ=="]]), 422),
    ("fp32: binary of the wrong size", InputTensor("input", "FP32", (1, 3), raw=b"\x00" * 8), 400),
    ("fp32: NaN", InputTensor("input", "FP32", (1, 2), data=[1.0, float("nan")]), 422),
    ("fp32: infinity in binary", InputTensor("input", "FP32", (1,), raw=np.float32(np.inf).tobytes()), 422),
    ("fp32: a number beyond float32", InputTensor("input", "FP32", (1,), data=[1e39]), 422),
    ("fp32: ragged nesting", InputTensor("input", "FP32", (2, 2), data=[[1, 2], [3]]), 422),
    ("fp32: nested unlike the shape", InputTensor("input", "FP32", (2, 2), data=[[1, 2, 3, 4]]), 422),
    ("fp32: strings", InputTensor("input", "FP32", (2,), data=["1", "2"]), 422),
    ("fp32: booleans", InputTensor("input", "FP32", (2,), data=[True, False]), 422),
    ("fp32: a null", InputTensor("input", "FP32", (2,), data=[1, None]), 422),
]


@pytest.mark.parametrize(("case", "tensor", "status"), BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensor_data_is_refused_with_a_status(case: str, tensor: InputTensor, status: int) -> None:
    with pytest.raises(CodecError) as e:
        (byte_elements if tensor.datatype == "BYTES" else fp32_array)(tensor)
    assert e.value.status == status and e.value.message


def test_tensor_data_flat_or_nested_reads_the_same() -> None:
    nested = fp32_array(InputTensor("input", "FP32", (2, 2), data=[[1, 2], [3, 4]]))
    flat = fp32_array(InputTensor("input", "FP32", (2, 2), data=[1, 2, 3, 4]))
    np.testing.assert_array_equal(nested, flat)
    assert nested.dtype == np.float32 and nested.shape == (2, 2)
    encoded = [base64.b64encode(x).decode() for x in (b"a", b"bc")]
    assert byte_elements(InputTensor("image", "BYTES", (2, 1), data=[[e] for e in encoded])) == [b"a", b"bc"]
    assert byte_elements(InputTensor("image", "BYTES", (2, 1), data=encoded)) == [b"a", b"bc"]


def test_compressed_bodies_are_expanded_within_the_limit() -> None:
    body = b'{"inputs": []}' * 100
    assert decompress(gzip.compress(body), "gzip", 10_000) == body
    assert decompress(zlib.compress(body), "deflate", 10_000) == body
    assert decompress(body, None, 10) == body  # the limit applies to what was read, elsewhere
    for payload, encoding, limit, status in [
        (gzip.compress(b"\0" * 1_000_000), "gzip", 10_000, 413),  # a small bomb
        (b"not gzip at all", "gzip", 10_000, 400),
        (gzip.compress(body)[:-12], "gzip", 10_000, 400),  # truncated
        (gzip.compress(body) + b"junk", "gzip", 10_000, 400),
        (body, "br", 10_000, 415),
    ]:
        with pytest.raises(CodecError) as e:
            decompress(payload, encoding, limit)
        assert e.value.status == status, (encoding, e.value.message)


# -- the real server, through tritonclient ------------------------------------------------------


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StoredVersion, StoredVersion]:
    """A registry with two tiny_cnn versions: ``production`` points to the first."""
    home = tmp_path_factory.mktemp("oip") / "bentoml"
    reg = Registry(home)
    first = export_catalog("tiny_cnn", registry=reg)
    second = export_catalog("tiny_cnn", registry=reg)
    reg.set_alias(first.tag, "production")
    return home, first, second


@pytest.fixture(scope="module")
def server(
    versions: tuple[Path, StoredVersion, StoredVersion], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    home = versions[0]
    srv = start_server(
        home,
        ["tiny_cnn@production"],
        tmp_path_factory.mktemp("oip-log") / "server.log",
        BACKBONES_WORKERS="1",
        BACKBONES_QUEUE_LIMIT=str(QUEUE_LIMIT),
        BACKBONES_REQUEST_TIMEOUT_SECONDS="5",
    )
    yield srv
    stop_server(srv)


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30) as c:
        yield c


def images_input(images: list[bytes], *, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(x).decode() for x in images]
    return tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary)


def parse_classes(strings: np.ndarray) -> list[list[tuple[float, int, str]]]:
    rows = []
    for row in strings:
        parsed = []
        for s in row:
            score, index, label = (s.decode() if isinstance(s, bytes) else s).split(":", 2)
            parsed.append((float(score), int(index), label))
        rows.append(parsed)
    return rows


@pytest.mark.slow
def test_health_and_metadata(
    client: triton.InferenceServerClient, versions: tuple[Path, StoredVersion, StoredVersion]
) -> None:
    _, first, second = versions
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny_cnn") and client.is_model_ready("tiny_cnn@production")
    assert client.is_model_ready("tiny_cnn", first.spec.version)
    assert client.is_model_ready("tiny_cnn", first.spec.version[:6])  # a unique prefix will do
    assert not client.is_model_ready("tiny_cnn", second.spec.version)  # registered, not served
    assert not client.is_model_ready("no_such_model")
    server_doc = client.get_server_metadata()
    assert server_doc["name"] == "backbones"
    assert set(server_doc["extensions"]) == {"binary_tensor_data", "classification"}
    for model, version in (("tiny_cnn", ""), ("tiny_cnn@production", ""), ("tiny_cnn", first.spec.version)):
        doc = client.get_model_metadata(model, version)
        assert doc["name"] == "tiny_cnn" and doc["versions"] == [first.spec.version]
        assert doc["platform"] == "onnxruntime_onnx"
        assert doc["inputs"] == [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 64, 64]},
        ]
        assert doc["outputs"] == [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "features", "datatype": "FP32", "shape": [-1, 32]},
        ]
    for model, version in (("no_such_model", ""), ("tiny_cnn@staging", ""), ("tiny_cnn", second.spec.version)):
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata(model, version)
        assert e.value.status() == "404" and "not served here" in e.value.message()


@pytest.mark.slow
def test_a_batch_in_binary_and_in_json_equals_classify_and_embed(
    server: Server, client: triton.InferenceServerClient
) -> None:
    images = [jpeg_bytes(i) for i in range(4)]
    expected_classes = []
    expected_features = []
    for data in images:
        preds = server.post("/classify", data, top_k="3").json()["predictions"]
        expected_classes.append([(p["score"], p["index"], p["label"]) for p in preds])
        expected_features.append(server.post("/embed", data).json()["embedding"])
    for binary in (True, False):
        outputs = [
            triton.InferRequestedOutput("logits", binary_data=binary, class_count=3),
            triton.InferRequestedOutput("features", binary_data=binary),
        ]
        result = client.infer("tiny_cnn", [images_input(images, binary=binary)], outputs=outputs, request_id="b")
        classes = parse_classes(result.as_numpy("logits"))
        assert [[(i, label) for _, i, label in row] for row in classes] == [
            [(i, label) for _, i, label in row] for row in expected_classes
        ]
        for got, want in zip(classes, expected_classes, strict=True):
            assert [s for s, _, _ in got] == pytest.approx([s for s, _, _ in want], abs=1e-6)
        np.testing.assert_allclose(result.as_numpy("features"), np.asarray(expected_features), atol=1e-5)
        doc = result.get_response()
        assert doc["id"] == "b" and doc["model_name"] == "tiny_cnn"
        assert [o["name"] for o in doc["outputs"]] == ["logits", "features"]  # only those asked for
        assert all(("parameters" in o) == binary for o in doc["outputs"])
    # no outputs named: both tensors, in binary (tritonclient's default)
    result = client.infer("tiny_cnn", [images_input(images[:1])])
    assert result.as_numpy("logits").shape == (1, 10) and result.as_numpy("features").shape == (1, 32)
    np.testing.assert_allclose(result.as_numpy("features")[0], expected_features[0], atol=1e-5)


@pytest.mark.slow
def test_preprocessed_fp32_input_equals_the_photos_embed_vector(
    server: Server, client: triton.InferenceServerClient, versions: tuple[Path, StoredVersion, StoredVersion]
) -> None:
    local = InferenceModel(versions[1])
    photos = [jpeg_bytes(7), jpeg_bytes(8)]
    pixels = np.stack([local.loader(p) for p in photos])
    embeds = [server.post("/embed", p).json()["embedding"] for p in photos]
    for binary in (True, False):
        tensor = triton.InferInput("input", list(pixels.shape), "FP32").set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer("tiny_cnn", [tensor], outputs=[triton.InferRequestedOutput("features", binary)])
        np.testing.assert_allclose(result.as_numpy("features"), np.asarray(embeds), atol=1e-5)
        assert [o["name"] for o in result.get_response()["outputs"]] == ["features"]


@pytest.mark.slow
def test_version_pinned_and_alias_routes(
    client: triton.InferenceServerClient, versions: tuple[Path, StoredVersion, StoredVersion]
) -> None:
    _, first, second = versions
    image = [images_input([jpeg_bytes(3)])]
    reference = client.infer("tiny_cnn", image).as_numpy("logits")
    for model, version in (
        ("tiny_cnn@production", ""),
        ("tiny_cnn", first.spec.version),
        ("tiny_cnn", first.spec.version[:6]),
        (first.spec.tag, ""),
    ):
        result = client.infer(model, image, model_version=version)
        assert result.get_response()["model_version"] == first.spec.version, (model, version)
        np.testing.assert_array_equal(result.as_numpy("logits"), reference)
    for model, version in (
        ("tiny_cnn", second.spec.version),  # registered, not the served one
        ("tiny_cnn", "zzzzzz"),
        ("tiny_cnn@staging", ""),
        ("resnet50", ""),
        ("../etc", ""),
    ):
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, image, model_version=version)
        assert e.value.status() == "404", (model, version, e.value.message())


@pytest.mark.slow
def test_request_compression_and_error_statuses_reach_tritonclient(client: triton.InferenceServerClient) -> None:
    image = [images_input([jpeg_bytes(2)])]
    plain = client.infer("tiny_cnn", image).as_numpy("features")
    for algorithm in ("gzip", "deflate"):
        compressed = client.infer("tiny_cnn", image, request_compression_algorithm=algorithm).as_numpy("features")
        np.testing.assert_array_equal(compressed, plain)
    for outputs, status in (
        ([triton.InferRequestedOutput("logits", class_count=11)], "422"),  # 10 classes
        ([triton.InferRequestedOutput("probabilities")], "422"),
    ):
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny_cnn", image, outputs=outputs)
        assert e.value.status() == status and e.value.message()


def json_header(r: httpx.Response) -> dict[str, Any]:
    """The JSON part of a response (all of it, unless binary outputs follow it)."""
    length = r.headers.get("inference-header-content-length")
    return json.loads(r.content[: int(length)] if length else r.content)  # type: ignore[no-any-return]


def _fp32_body(shape: list[int], values: np.ndarray | None = None) -> tuple[bytes, dict[str, str]]:
    raw = (values if values is not None else np.zeros(shape, np.float32)).astype("<f4").tobytes()
    doc = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": len(raw)}}]
    }
    return binary_body(doc, raw)


def _outputs(*outputs: dict[str, Any]) -> dict[str, Any]:
    return {"outputs": list(outputs)}


BAD_REQUESTS: list[tuple[str, str, tuple[bytes, dict[str, str]], int]] = [
    ("not JSON", "tiny_cnn", (b"{", {}), 400),
    ("header length beyond the body", "tiny_cnn", (b"{}", {"Inference-Header-Content-Length": "99"}), 400),
    ("negative header length", "tiny_cnn", (b"{}", {"Inference-Header-Content-Length": "-2"}), 400),
    (
        "binary sizes that do not add up",
        "tiny_cnn",
        (image_request([jpeg_bytes(0)])[0] + b"extra", image_request([jpeg_bytes(0)])[1]),
        400,
    ),
    (
        "a BYTES element with a bad length prefix",
        "tiny_cnn",
        binary_body(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]},
            b"\xff\xff\xff\x7fabcd",
        ),
        400,
    ),
    ("an undecodable image", "tiny_cnn", image_request([jpeg_bytes(0), b"hello, not an image"]), 400),
    ("an empty image", "tiny_cnn", image_request([b""]), 400),
    ("a truncated JPEG", "tiny_cnn", image_request([jpeg_bytes(0)[:2000]]), 400),
    (
        "FP32 data of the wrong size",
        "tiny_cnn",
        binary_body(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 3, 64, 64],
                        "parameters": {"binary_data_size": 100},
                    }
                ]
            },
            b"\0" * 100,
        ),
        400,
    ),
    ("an unknown model", "no_such_model", image_request([jpeg_bytes(0)]), 404),
    ("an alias that is not served", "tiny_cnn@staging", image_request([jpeg_bytes(0)]), 404),
    ("more images than a request may carry", "tiny_cnn", image_request([jpeg_bytes(0)] * (QUEUE_LIMIT + 1)), 413),
    (
        "a huge N with little data",
        "tiny_cnn",
        binary_body(
            {
                "inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [10**12], "parameters": {"binary_data_size": 5}}
                ]
            },
            bytes_tensor([b"a"]),
        ),
        413,
    ),
    ("a 30000x30000 PNG", "tiny_cnn", image_request([png_declaring(30000, 30000)]), 413),
    ("a body over the limit", "tiny_cnn", (b"\0" * (21 * 1024 * 1024), {}), 413),
    ("a multipart body", "tiny_cnn", (b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"}), 415),
    ("an unsupported Content-Encoding", "tiny_cnn", (b"{}", {"Content-Encoding": "br"}), 415),
    ("an ICO image", "tiny_cnn", image_request([image_bytes(Image.new("RGB", (16, 16)), "ICO")]), 415),
    ("no images", "tiny_cnn", image_request([]), 422),
    ("FP32 of the wrong shape", "tiny_cnn", _fp32_body([1, 3, 32, 32]), 422),
    ("FP32 with NaN", "tiny_cnn", _fp32_body([1, 3, 64, 64], np.full((1, 3, 64, 64), np.nan)), 422),
    (
        "image as FP32",
        "tiny_cnn",
        binary_body(
            {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
            b"\0" * 4,
        ),
        422,
    ),
    ("an unknown input", "tiny_cnn", (json.dumps(_tensor([1], [1], name="pixels")).encode(), {}), 422),
    (
        "two inputs",
        "tiny_cnn",
        (
            json.dumps(
                {
                    "inputs": [
                        _tensor(["YQ=="], [1], "image", "BYTES")["inputs"][0],
                        _tensor([1.0], [1], "input")["inputs"][0],
                    ]
                }
            ).encode(),
            {},
        ),
        422,
    ),
    ("an unknown output", "tiny_cnn", image_request([jpeg_bytes(0)], **_outputs({"name": "probs"})), 422),
    (
        "classification 0",
        "tiny_cnn",
        image_request([jpeg_bytes(0)], **_outputs({"name": "logits", "parameters": {"classification": 0}})),
        422,
    ),
    (
        "classification beyond the classes",
        "tiny_cnn",
        image_request([jpeg_bytes(0)], **_outputs({"name": "logits", "parameters": {"classification": 11}})),
        422,
    ),
    (
        "classification of features",
        "tiny_cnn",
        image_request([jpeg_bytes(0)], **_outputs({"name": "features", "parameters": {"classification": 1}})),
        422,
    ),
    (
        "JSON data nested wrongly",
        "tiny_cnn",
        (json.dumps(_tensor([[[0.0] * 64] * 64] * 2, [1, 3, 64, 64], name="input")).encode(), {}),
        422,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "model", "request_", "status"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_status_and_a_json_error(
    server: Server, case: str, model: str, request_: tuple[bytes, dict[str, str]], status: int
) -> None:
    body, headers = request_
    r = post(infer_url(server.url, model), body, headers)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    ok = post(infer_url(server.url, "tiny_cnn"), *image_request([jpeg_bytes(1)]))  # still answering
    assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_wrong_methods_and_routes_are_json_errors(server: Server) -> None:
    for method, path, status in (
        ("GET", "/v2/models/tiny_cnn/infer", 405),
        ("POST", "/v2/models/tiny_cnn", 405),
        ("GET", "/v2/models/tiny_cnn/stats", 404),
        ("GET", "/v2/models/no_such_model/ready", 404),
    ):
        r = httpx.request(method, server.url + path)
        assert r.status_code == status and r.json()["error"], (method, path, r.text)
    live, ready = httpx.get(server.url + "/v2/health/live"), httpx.get(server.url + "/v2/health/ready")
    assert (live.status_code, live.content, ready.status_code, ready.content) == (200, b"", 200, b"")


@pytest.mark.slow
def test_overload_is_503_with_retry_after_and_nothing_sticks(server: Server) -> None:
    """Each image takes an admission place: full requests at once overflow the queue limit."""
    body, headers = image_request([jpeg_bytes(i) for i in range(QUEUE_LIMIT)])

    def one(_: int) -> httpx.Response:
        return post(infer_url(server.url, "tiny_cnn"), body, headers)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(one, range(36)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["retry-after"]) >= 1 and "overloaded" in refused.json()["error"]
    # every place was given back: a full request is admitted again
    assert post(infer_url(server.url, "tiny_cnn"), body, headers).status_code == 200


@pytest.mark.slow
def test_metrics_count_the_protocol(server: Server) -> None:
    before = server.metric("backbones_requests_total", endpoint="infer", protocol="oip", outcome="ok")
    refused = server.metric("backbones_requests_total", endpoint="infer", protocol="oip", outcome="client_error")
    own = server.metric("backbones_requests_total", endpoint="classify", protocol="backbones", outcome="ok")
    for _ in range(3):
        assert post(infer_url(server.url, "tiny_cnn"), *image_request([jpeg_bytes(0)])).status_code == 200
    assert post(infer_url(server.url, "tiny_cnn"), b"{").status_code == 400
    assert server.post("/classify", jpeg_bytes(0)).status_code == 200
    assert server.metric("backbones_requests_total", endpoint="infer", protocol="oip", outcome="ok") - before == 3
    assert (
        server.metric("backbones_requests_total", endpoint="infer", protocol="oip", outcome="client_error") - refused
        == 1
    )
    assert server.metric("backbones_requests_total", endpoint="classify", protocol="backbones", outcome="ok") > own


@pytest.mark.slow
def test_a_slow_upload_times_out_with_504(server: Server) -> None:
    from .test_faults import SlowUpload

    body = json.dumps(_tensor([base64.b64encode(jpeg_bytes(0)).decode()], [1], "image", "BYTES")).encode()
    slow = SlowUpload(server.port, "/v2/models/tiny_cnn/infer", body, "application/json", seconds=9.0)  # timeout: 5 s
    slow.start()
    assert post(infer_url(server.url, "tiny_cnn"), *image_request([jpeg_bytes(1)])).status_code == 200
    slow.join(timeout=30)
    assert slow.status == 504, (slow.error, slow.response[:200])
    assert json.loads(slow.response)["error"]


@pytest.mark.slow
def test_the_infer_route_follows_a_hot_swap(
    server: Server, client: triton.InferenceServerClient, versions: tuple[Path, StoredVersion, StoredVersion]
) -> None:
    """Last of the server's tests: it moves the alias the server follows (and moves it back)."""
    _, first, second = versions
    stop, seen = threading.Event(), list[tuple[int, str]]()

    def hammer() -> None:
        body, headers = image_request([jpeg_bytes(0), jpeg_bytes(1)])
        while not stop.is_set():
            r = post(infer_url(server.url, "tiny_cnn@production"), body, headers)
            seen.append((r.status_code, json_header(r).get("model_version", r.text)))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        server.registry.set_alias(second.tag, "production")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(v == second.spec.version for _, v in seen[-3:]):
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.registry.set_alias(first.tag, "production")
    assert {s for s, _ in seen} == {200}, [x for x in seen if x[0] != 200][:3]
    assert seen[0][1] == first.spec.version and seen[-1][1] == second.spec.version
    deadline = time.monotonic() + 30  # back where it was, for the tests that come after
    while client.get_model_metadata("tiny_cnn")["versions"] != [first.spec.version]:
        assert time.monotonic() < deadline, "the swap back did not happen"
        time.sleep(0.1)


@pytest.mark.slow
def test_readiness_turns_503_while_draining_and_inference_goes_on(tiny_registry: Registry, tmp_path: Path) -> None:
    delay = 3.0
    server = start_server(
        tiny_registry.home,
        ["tiny_cnn"],
        tmp_path / "server.log",
        BACKBONES_WORKERS="1",
        BACKBONES_DRAIN_DELAY_SECONDS=str(delay),
    )
    try:
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
        sigterm_at = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        while (r := httpx.get(server.url + "/v2/health/ready")).status_code == 200:
            assert time.monotonic() < sigterm_at + delay / 2, "readiness still 200"
            time.sleep(0.05)
        assert r.status_code == 503 and r.json() == {"error": "not ready: draining"}
        assert httpx.get(server.url + "/v2/models/tiny_cnn/ready").status_code == 200
        answer = post(infer_url(server.url, "tiny_cnn"), *image_request([jpeg_bytes(0)]))
        assert answer.status_code == 200 and time.monotonic() < sigterm_at + delay  # within the delay
        server.proc.wait(timeout=60)
    finally:
        stop_server(server)


def test_the_infer_routes_are_left_out_of_tracing_like_the_image_routes() -> None:
    from opentelemetry.util.http import ExcludeList

    from models import Settings
    from service.bento import tracing_config

    excluded = ExcludeList(tracing_config(Settings())["excluded_urls"])
    assert excluded.url_disabled("http://127.0.0.1:3000/v2/models/tiny_cnn/infer")
    assert excluded.url_disabled("http://127.0.0.1:3000/v2/models/tiny_cnn%40production/versions/ab12/infer?x=1")
    assert not excluded.url_disabled("http://127.0.0.1:3000/v2/models/tiny_cnn")
    assert not excluded.url_disabled("http://127.0.0.1:3000/v2/models/tiny_cnn/inference")
    assert excluded.url_disabled("http://127.0.0.1:3000/classify")


# -- deploy/kserve ------------------------------------------------------------------------------


def test_the_kserve_inferenceservice_runs_the_cpu_pod_with_protocol_v2() -> None:
    """deploy/kserve is the Deployment of deploy/base with the patch of deploy/overlays/cpu, as a
    custom predictor whose PROTOCOL is v2, probed through the protocol's health routes."""
    deploy = ROOT / "deploy"
    (isvc,) = [d for d in yaml.safe_load_all((deploy / "kserve" / "inferenceservice.yaml").read_text()) if d]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    pod = yaml.safe_load((deploy / "base" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    (patch,) = yaml.safe_load((deploy / "overlays" / "cpu" / "resources.yaml").read_text())["spec"]["template"]["spec"][
        "containers"
    ]
    (ours,) = pod["containers"]
    predictor = isvc["spec"]["predictor"]
    (theirs,) = predictor["containers"]
    assert theirs["name"] == "kserve-container"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in theirs["env"]}
    assert env.pop("PROTOCOL") == "v2"  # how KServe reads a custom predictor's protocol version
    assert env == {e["name"]: e.get("value", e.get("valueFrom")) for e in ours["env"] + patch["env"]}
    merged = {k: {**ours["resources"].get(k, {}), **v} for k, v in patch["resources"].items()}
    assert theirs["resources"] == merged  # the overlay's patch merges into the base's resources
    for key in ("image", "args", "workingDir", "volumeMounts", "securityContext", "lifecycle"):
        assert theirs[key] == ours[key], key
    assert [p["containerPort"] for p in theirs["ports"]] == [p["containerPort"] for p in ours["ports"]]
    probes = {name: theirs[name]["httpGet"] for name in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/live"
    assert {p["port"] for p in probes.values()} == {theirs["ports"][0]["containerPort"]}
    for key in ("volumes", "terminationGracePeriodSeconds", "securityContext", "automountServiceAccountToken"):
        assert predictor[key] == pod[key], key
