"""The plain multipart/form-data reader (service/multipart.py) against Starlette's parser, and the
ASGI path that serves the image routes with it (service/http.py ``ImageRoutes``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from models import Registry, Settings
from service.http import ImageRoutes, create_app
from service.multipart import MAX_FIELDS, Part, boundary_of, read_plain_form, starlette_parts
from service.pool import ModelPool

from .conftest import fuzz_budget, jpeg_bytes
from .serving import BOUNDARY, FORM_TYPE, asgi_call, form_body


def parsed_by_starlette(body: bytes, content_type: str) -> list[Part] | str:
    """What Starlette's parser makes of the body, with the service's limits: parts, or the error."""

    async def parse() -> list[Part] | str:
        request = Request({"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]})
        request._body = body
        try:
            return await starlette_parts(request)
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    return asyncio.run(parse())


def test_reads_what_curl_sends() -> None:
    photo = jpeg_bytes(0)
    body = form_body([("image", photo, "cat.jpg"), ("model", b"antsbees@production", None), ("top_k", b"2", None)])
    parts = read_plain_form(body, FORM_TYPE)
    assert parts == [Part("image", photo, True), Part("model", "antsbees@production", False), Part("top_k", "2", False)]
    assert parts == parsed_by_starlette(body, FORM_TYPE)
    assert read_plain_form(body, f'multipart/form-data; boundary="{BOUNDARY}"') == parts
    # an empty file and an empty field are still parts
    empty = form_body([("image", b"", "x.jpg"), ("top_k", b"", None)])
    assert read_plain_form(empty, FORM_TYPE) == [Part("image", b"", True), Part("top_k", "", False)]


@pytest.mark.parametrize(
    "body, content_type",
    [
        (form_body([("image", b"abc", "a.jpg")]), "multipart/form-data"),  # no boundary
        (form_body([("image", b"abc", "a.jpg")]), "application/x-www-form-urlencoded"),
        (form_body([("image", b"abc", "a.jpg")]).replace(b"\r\n", b"\n"), FORM_TYPE),  # bare LF line breaks
        (form_body([("image", b"abc", "a.jpg")], closing=b"\r\n"), FORM_TYPE),  # no closing delimiter
        (form_body([("image", b"abc", "a.jpg")], closing=b"--\r\nepilogue"), FORM_TYPE),
        (b"preamble\r\n" + form_body([("image", b"abc", "a.jpg")]), FORM_TYPE),
        (form_body([("image", b"abc", "a.jpg")]).replace(b'name="image"', b'name="im\\"age"'), FORM_TYPE),
        (form_body([("image", b"abc", "a.jpg")]).replace(b'filename="a.jpg"', b"filename*=UTF-8''a.jpg"), FORM_TYPE),
        (form_body([("image", b"abc", "a.jpg")]).replace(b"form-data", b"attachment"), FORM_TYPE),
        (form_body([("image", b"abc", "a.jpg"), ("image", b"def", "b.jpg")]), FORM_TYPE),  # more files than allowed
        (form_body([(f"f{i}", b"v", None) for i in range(MAX_FIELDS + 1)]), FORM_TYPE),  # more fields than allowed
        (form_body([("model", b"\xff\xfe", None)]), FORM_TYPE),  # a field that is not UTF-8
        (
            form_body([("image", b"abc", "a.jpg")]).replace(
                b"Content-Type: application/octet-stream", b"Content-Transfer-Encoding: base64"
            ),
            FORM_TYPE,
        ),
        # header lines Starlette refuses or reads differently (found in review)
        (form_body([("image", b"abc", "a.jpg")]).replace(b"Content-Disposition:", b"Content-Disposition :"), FORM_TYPE),
        (
            form_body([("image", b"abc", "a.jpg")]).replace(b"Content-Disposition:", b"\x0cContent-Disposition:"),
            FORM_TYPE,
        ),
        (form_body([("image", b"abc", "a.jpg")]).replace(b"Content-Type:", b"X(Y): 1\r\nContent-Type:"), FORM_TYPE),
        (form_body([("image", b"abc", "a.jpg")]).replace(b"application/", b"appli\rcation/"), FORM_TYPE),
        (
            form_body([("image", b"abc", "a.jpg")]).replace(b"Content-Type:", b"X-A: 1\r\n" * 8 + b"Content-Type:"),
            FORM_TYPE,
        ),
        (
            form_body([("image", b"abc", "a.jpg")]).replace(
                b"Content-Type:", b"X-Pad: " + b"a" * 5000 + b"\r\nContent-Type:"
            ),
            FORM_TYPE,
        ),
        (form_body([("image", b"abc", "a.jpg")]).replace(b'; name="', b';\x0bname="'), FORM_TYPE),
        (form_body([("image", b"abc", "a.jpg")]).replace(b'name="image"', b'name=\x0c"image"'), FORM_TYPE),
        (form_body([("image", b"abc", "a.jpg")]).replace(b'name="image"', b'name="ima\nge"'), FORM_TYPE),
        # content types Starlette reads differently
        (form_body([("image", b"abc", "a.jpg")], "q" * 300), "multipart/form-data; boundary=" + "q" * 300),
        (form_body([("model", "m\u00e4".encode(), None)]), FORM_TYPE + "; charset=latin-1"),
        (form_body([("top_k", b"12", None)]), FORM_TYPE + "; charset=utf-16"),
        (form_body([("image", b"abc", "a.jpg")]), FORM_TYPE + "\xa0"),
        (form_body([("image", b"abc", "a.jpg")]), f"multipart/form-data\xa0; boundary={BOUNDARY}"),
    ],
)
def test_anything_but_the_plain_form_is_left_to_starlette(body: bytes, content_type: str) -> None:
    assert read_plain_form(body, content_type) is None


def test_boundary_parameter() -> None:
    assert boundary_of("multipart/form-data; boundary=abc") == b"abc"
    assert boundary_of('Multipart/Form-Data; charset=utf-8; boundary="a b"') == b"a b"
    for bad in ("multipart/form-data", "multipart/mixed; boundary=abc", "multipart/form-data; boundary=", "text/plain"):
        assert boundary_of(bad) is None


names = st.sampled_from(["image", "model", "top_k", "extra", "n\u00e4me"])
contents = st.binary(max_size=64) | st.sampled_from([b"\r\n", b"--", f"\r\n--{BOUNDARY}".encode(), b"\r\n\r\n"])
part_lists = st.lists(st.tuples(names, contents, st.none() | st.sampled_from(["a.jpg", "", "x y.png"])), max_size=5)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, **fuzz_budget(200))
@given(
    parts=part_lists,
    mangle=st.sampled_from(["none", "cut", "lf", "epilogue", "header", "byte"]),
    odd=st.sampled_from([b"\x0b", b"\x0c", b"\r", b"\n", b"\xa0", b"\t", b" ", b'"', b";", b"\x00"]),
    at=st.integers(min_value=0, max_value=10_000),
    ctype=st.sampled_from(
        [FORM_TYPE, FORM_TYPE + "; charset=utf-8", FORM_TYPE + "; charset=latin-1", f'{FORM_TYPE}; x="y"']
    ),
)
def test_agrees_with_starlette_wherever_it_answers(
    parts: list[tuple[str, bytes, str | None]], mangle: str, odd: bytes, at: int, ctype: str
) -> None:
    """On generated bodies, plain and mangled (an odd byte put anywhere, content types with more
    parameters): where the fast reader answers, Starlette's parser gives the same parts; where
    Starlette refuses, the fast reader declines too."""
    body = form_body(parts)
    if mangle == "byte":
        at %= len(body) + 1
        body = body[:at] + odd + body[at:]
    elif mangle == "cut":
        body = body[: len(body) // 2]
    elif mangle == "lf":
        body = body.replace(b"\r\n", b"\n")
    elif mangle == "epilogue":
        body += b"trailing"
    elif mangle == "header":
        body = body.replace(b"Content-Type: application", b" folded: application", 1)
    fast = read_plain_form(body, ctype)
    slow = parsed_by_starlette(body, ctype)
    if fast is not None:
        assert fast == slow
    if isinstance(slow, str):
        assert fast is None, slow


def test_image_routes_answer_before_the_inner_apps(tiny_registry: Registry) -> None:
    """POST /classify and /embed are answered by ImageRoutes with the app's handler; other methods
    and paths go on to the inner app (which answers GET /classify with 405)."""
    pool = ModelPool(["tiny_cnn"], settings=Settings(bentoml_home=tiny_registry.home), registry=tiny_registry)
    app = create_app(pool)
    passed: list[str] = []

    async def inner(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        passed.append(f"{scope['method']} {scope['path']}")
        await app(scope, receive, send)

    routes = ImageRoutes(inner, fastapi_app=app)

    async def scenario() -> list[tuple[int, bytes]]:
        await pool.start()
        try:
            photo = form_body([("image", jpeg_bytes(1), "p.jpg"), ("top_k", b"3", None)])
            return [
                await asgi_call(routes, "POST", "/classify", photo),
                await asgi_call(routes, "POST", "/embed", photo),
                await asgi_call(routes, "POST", "/classify", form_body([("top_k", b"0", None)])),
                await asgi_call(routes, "POST", "/classify", b"{}", "application/json"),
                await asgi_call(routes, "GET", "/classify"),
            ]
        finally:
            await pool.close()

    (classified, embedded, missing, json_body, get) = asyncio.run(scenario())
    assert classified[0] == 200 and b'"predictions"' in classified[1] and classified[1].count(b'"index"') == 3
    assert embedded[0] == 200 and b'"dim":32' in embedded[1]
    assert missing == (422, b'{"error":"missing file field \'image\'"}')
    assert json_body[0] == 415 and b"expected multipart/form-data" in json_body[1]
    assert get[0] == 405
    assert passed == ["GET /classify"]  # the POSTs never reached the inner apps
