"""The pieces of the HTTP API one at a time, in process (service/http.py, form.py, errors.py): what
the routes answer is assembled from these, so a piece that breaks fails here with its own name."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from models import Registry, Settings
from models.inference import DEFAULT_TOP_K
from service.errors import IMAGE_ERRORS, ApiError, error_for
from service.form import FORM_FIELDS, ImageForm, image_form, read_form
from service.http import CLASSIFY, EMBED, IMAGE_ROUTES, choose_model, create_app, parse_top_k, response_body
from service.multipart import Part
from service.pool import ModelPool

from .serving import FORM_TYPE, asgi_call, form_body

# bentoml.metrics (used by service/metrics.py) warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:bentoml.metrics module is deprecated:DeprecationWarning")


def refused(call: object, *args: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def test_top_k_defaults_and_bounds() -> None:
    assert parse_top_k(None, 1000) == DEFAULT_TOP_K
    assert parse_top_k("  ", 1000) == DEFAULT_TOP_K
    assert parse_top_k(None, 2) == 2  # never more than the model's classes
    assert parse_top_k(" 7 ", 10) == 7
    for raw, message in (("0", "between 1 and 10"), ("11", "between 1 and 10"), ("five", "must be an integer")):
        error = refused(parse_top_k, raw, 10)
        assert error.status == 422 and message in error.message, raw


def test_the_form_takes_one_file_and_known_text_fields() -> None:
    photo = Part("image", b"\xff\xd8", True)
    form = image_form([photo, Part("top_k", "1", False), Part("model", "a", False), Part("model", "b", False)])
    assert form == ImageForm(b"\xff\xd8", model="b", top_k="1")  # a repeated field: the last one counts
    assert image_form([photo]) == ImageForm(b"\xff\xd8")
    cases = [
        ([Part("img", b"x", True)], "missing file field 'image' (got fields: img)"),
        ([Part("image", "http://x/cat.jpg", False)], "URLs are never fetched"),
        ([photo, Part("model", b"x", True)], "field 'model' must be text, not a file"),
        ([photo, Part("size", "3", False)], f"unknown field(s): size; accepted: {', '.join(FORM_FIELDS)}"),
    ]
    for parts, message in cases:
        error = refused(image_form, parts)
        assert error.status == 422 and message in error.message, message


def test_a_body_over_the_limit_is_refused_before_it_is_parsed() -> None:
    body = form_body([("image", b"x" * 100, "a.jpg")])

    async def read(limit: int, ctype: str = FORM_TYPE) -> ImageForm | ApiError:
        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "headers": [(b"content-type", ctype.encode())]}
        try:
            return await read_form(scope, receive, limit)
        except ApiError as e:
            return e

    assert asyncio.run(read(len(body))) == ImageForm(b"x" * 100)
    too_big = asyncio.run(read(len(body) - 1))
    assert isinstance(too_big, ApiError) and too_big.status == 413
    not_a_form = asyncio.run(read(len(body), "application/json"))
    assert isinstance(not_a_form, ApiError) and not_a_form.status == 415


def test_every_refusal_is_a_json_error_with_its_status_and_headers() -> None:
    def answer(exc: Exception) -> tuple[int, dict[str, str], dict[str, str]]:
        response = error_for(exc)
        return response.status_code, dict(response.headers), json.loads(response.body)

    status, headers, body = answer(ApiError(503, "overloaded", {"Retry-After": "3"}))
    assert (status, headers["retry-after"], body) == (503, "3", {"error": "overloaded"})
    status, headers, body = answer(HTTPException(405, "Method Not Allowed", {"Allow": "POST"}))
    assert (status, headers["allow"], body) == (405, "POST", {"error": "method not allowed"})
    status, _, body = answer(RequestValidationError([{"loc": ("query", "x"), "msg": "bad", "type": "value_error"}]))
    assert status == 422 and body["error"].startswith("invalid request:")
    with pytest.raises(TypeError):
        error_for(ValueError("a bug is not a refusal"))


def test_a_model_not_served_or_not_loaded_is_refused(registry: Registry) -> None:
    pool = ModelPool(["tiny_cnn", "other@production"], settings=Settings(), registry=registry)  # nothing loaded
    not_loaded = refused(choose_model, pool, None)  # the first served model
    assert not_loaded.status == 503 and not_loaded.headers["Retry-After"].isdigit()
    assert "tiny_cnn is not loaded yet: loading" in not_loaded.message
    elsewhere = refused(choose_model, pool, "resnet50")
    assert elsewhere.status == 404 and "served: tiny_cnn, other@production" in elsewhere.message
    bad = refused(choose_model, pool, "../x")
    assert bad.status == 404 and "unknown model '../x'" in bad.message


def test_response_bodies(tiny_registry: Registry) -> None:
    spec = tiny_registry.get("tiny_cnn").spec
    logits = np.arange(spec.num_classes, dtype=np.float32)
    features = np.linspace(0, 1, spec.feature_dim, dtype=np.float32)
    classified = response_body(CLASSIFY, spec, logits, features, 3)
    assert classified["model"] == spec.tag
    assert [p["index"] for p in classified["predictions"]] == [spec.num_classes - 1 - i for i in range(3)]
    assert classified["predictions"][0]["label"] == spec.labels[-1]
    embedded = response_body(EMBED, spec, logits, features, 0)
    assert embedded == {"model": spec.tag, "dim": spec.feature_dim, "embedding": features.tolist()}


def test_the_document_declares_the_form_and_every_error(registry: Registry) -> None:
    app = create_app(ModelPool(["tiny_cnn"], settings=Settings(), registry=registry))
    doc = app.openapi()
    for route in IMAGE_ROUTES:
        operation = doc["paths"][route]["post"]
        schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(schema["properties"]) == set(FORM_FIELDS)
        assert schema["properties"]["top_k"]["default"] == DEFAULT_TOP_K
        assert set(operation["responses"]) == {"200", *map(str, IMAGE_ERRORS)}
    # FastAPI's own routing answers in the same shape
    status, body = asyncio.run(asgi_call(app, "GET", IMAGE_ROUTES[0]))
    assert (status, json.loads(body)) == (405, {"error": "method not allowed"})
    status, body = asyncio.run(asgi_call(app, "GET", "/models"))
    assert status == 200 and json.loads(body)["ready"] is False
