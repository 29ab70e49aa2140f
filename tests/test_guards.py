"""The pieces that keep hostile traffic out, in process: admission before a body is read
(service/limits.py), reading a body into one buffer (service/form.py), counting multipart parts
before cutting them (service/multipart.py), bounded metric labels (service/paths.py), and what the
service says about itself (service/public.py). Against the real server: tests/test_hostile.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from models import Registry
from service.errors import ApiError, body_pending
from service.form import read_form
from service.limits import RETRY_AFTER_BUSY_SECONDS, Admission
from service.multipart import MAX_FIELDS, MAX_FILES, MAX_HEADERS, read_plain_form
from service.paths import UNMATCHED, RestorePaths, RouteLabels, static_paths
from service.public import public_spec, redact
from service.transport import install, refusal_bytes

from .conftest import fuzz_budget
from .serving import BOUNDARY, FORM_TYPE, form_body

MiB = 1024 * 1024

# -- admission ---------------------------------------------------------------------------------------


def busy(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args)
    assert info.value.status == 503 and info.value.headers == {"Retry-After": str(RETRY_AFTER_BUSY_SECONDS)}
    return info.value


def test_large_bodies_share_half_the_budget_and_small_ones_the_rest() -> None:
    admission = Admission(max_requests=300, budget_bytes=64 * MiB)  # large: over 8 MiB, together <= 32 MiB
    first = admission.admit(19 * MiB)
    assert "too many request bodies" in busy(admission.admit, 19 * MiB).message  # 38 MiB of large ones
    photos = [admission.admit(200_000) for _ in range(200)]  # ~38 MiB of photos still fit
    assert admission.held == 19 * MiB + 200 * 200_000
    first.release()
    first.release()  # releasing twice frees once
    second = admission.admit(19 * MiB)
    for p in photos:
        p.release()
    second.release()
    assert (admission.held, admission.held_large, admission.requests) == (0, 0, 0)


def test_requests_beyond_the_limit_are_refused_and_undeclared_bodies_grow() -> None:
    admission = Admission(max_requests=2, budget_bytes=16 * MiB)
    a, b = admission.admit(None), admission.admit(0)
    assert "too many requests in flight" in busy(admission.admit, 10).message
    a.grow(1 * MiB)
    a.grow(2 * MiB)  # now large (over 2 MiB): counted in the large share
    assert a.large and admission.held_large == 3 * MiB
    busy(a.grow, 6 * MiB)  # 9 MiB of large bodies: over half of 16
    b.grow(4 * MiB)  # b becomes large too: 7 MiB together
    a.release()
    b.release()
    assert (admission.held, admission.held_large, admission.requests) == (0, 0, 0)


@settings(**fuzz_budget(60))
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40 * MiB), st.integers(0, 5)), max_size=60))
def test_admission_never_holds_more_than_its_budget(steps: list[tuple[bool, int, int]]) -> None:
    admission = Admission(max_requests=8, budget_bytes=64 * MiB)
    held: list[Any] = []
    for admit, size, pick in steps:
        try:
            if admit or not held:
                held.append(admission.admit(size))
            else:
                held[pick % len(held)].grow(size // 8)
        except ApiError as e:
            assert e.status == 503
        assert admission.held <= admission.budget and admission.held_large <= admission.large_limit
        assert admission.requests == len(held) <= admission.max_requests
    for r in held:
        r.release()
    assert (admission.held, admission.held_large, admission.requests) == (0, 0, 0)


# -- reading a body -----------------------------------------------------------------------------------


def read(body: bytes, *, declared: int | None, pieces: int = 3, limit: int = MiB) -> Any:
    headers = [(b"content-type", FORM_TYPE.encode())]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    step = max(1, -(-len(body) // pieces))
    messages = [
        {"type": "http.request", "body": body[i : i + step], "more_body": i + step < len(body)}
        for i in range(0, len(body), step)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def run() -> Any:
        admission = Admission(max_requests=4, budget_bytes=4 * MiB)
        reservation = admission.admit(declared)
        try:
            return await read_form({"type": "http", "headers": headers}, receive, limit, reservation)
        except ApiError as e:
            return e
        finally:
            reservation.release()

    return asyncio.run(run())


def test_a_declared_body_is_read_into_one_buffer_of_its_size() -> None:
    body = form_body([("image", b"\xff\xd8photo", "a.jpg"), ("top_k", b"3", None)])
    form = read(body, declared=len(body))
    assert form.image == b"\xff\xd8photo" and form.top_k == "3"
    assert read(body, declared=None).image == b"\xff\xd8photo"  # chunked: grows as it arrives
    short = read(body[:-10], declared=len(body))  # the client stopped early (then the parser would say so)
    assert short.status == 400 and "ended after" in short.message
    assert read(body, declared=len(body), limit=len(body) - 1).status == 413  # on the declared length


def test_only_a_request_with_a_body_to_come_closes_its_connection_when_refused() -> None:
    def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {"headers": list(headers)}

    assert body_pending(scope((b"content-length", b"12")))
    assert body_pending(scope((b"transfer-encoding", b"chunked")))
    assert not body_pending(scope((b"content-length", b"0")))
    assert not body_pending(scope())


# -- multipart: counted before cut -----------------------------------------------------------------------


@settings(**fuzz_budget(80))
@given(
    st.lists(
        st.tuples(st.sampled_from(["image", "model", "top_k", "x"]), st.binary(max_size=40), st.booleans()),
        max_size=12,
    )
)
def test_a_body_in_a_bytearray_parses_as_the_same_bytes(parts: list[tuple[str, bytes, bool]]) -> None:
    body = form_body([(name, content, "f.bin" if is_file else None) for name, content, is_file in parts])
    assert read_plain_form(bytearray(body), FORM_TYPE) == read_plain_form(body, FORM_TYPE)


def test_many_parts_and_many_part_headers_are_refused_before_they_are_cut() -> None:
    part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nx\r\n'.encode()
    many = part * 200_000 + f"--{BOUNDARY}--\r\n".encode()  # 200,000 parts: one count, no split
    started = time.perf_counter()
    assert read_plain_form(many, FORM_TYPE) is None
    assert time.perf_counter() - started < 0.5
    most = [("image", b"x", "a.jpg")] * MAX_FILES + [("model", b"x", None)] * MAX_FIELDS
    assert read_plain_form(form_body(most), FORM_TYPE) is not None
    assert read_plain_form(form_body([*most, ("model", b"x", None)]), FORM_TYPE) is None
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS))
    head = b'Content-Disposition: form-data; name="image"; filename="a"\r\n' + headers
    body = f"--{BOUNDARY}\r\n".encode() + head + b"\r\nxx\r\n" + f"--{BOUNDARY}--\r\n".encode()
    assert read_plain_form(body, FORM_TYPE) is None  # too many header lines: Starlette decides


# -- metric labels ---------------------------------------------------------------------------------------


async def ok(request: Any) -> PlainTextResponse:
    return PlainTextResponse(request.url.path)


def app() -> Starlette:
    inner = Starlette(routes=[Route("/classify", ok, methods=["POST"]), Route("/v2/models/{name}/infer", ok)])
    return Starlette(routes=[Route("/livez", ok), Route("/", ok), Mount("/", app=inner)])


def label(path: str, method: str = "GET") -> str:
    labels = RouteLabels(app(), routes=app().routes)
    return labels.label({"type": "http", "path": path, "method": method, "root_path": "", "headers": []})


def test_a_path_is_labelled_with_its_route_template_or_the_shared_label() -> None:
    assert label("/livez") == "/livez"
    assert label("/classify") == label("/classify", "POST") == "/classify"  # a wrong method: still its route
    assert label("/v2/models/abc/infer") == label("/v2/models/x%20y/infer") == "/v2/models/{name}/infer"
    assert label("/livez/") == "/livez"  # redirected there
    assert label("/nope") == label("//") == label("/v2/models/a/b/infer") == UNMATCHED
    assert static_paths(app().routes) == {"/livez", "/", "/classify"}


@settings(**fuzz_budget(200))
@given(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60))
def test_no_path_makes_a_label_of_its_own(path: str) -> None:
    assert label("/" + path) in {"/livez", "/", "/classify", "/v2/models/{name}/infer", UNMATCHED}


def test_the_real_path_is_back_before_routing() -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])

    async def labelled(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])  # what BentoML's metrics see
        await RestorePaths(inner)(scope, receive, send)

    for path in ("/v2/models/abc/infer", "/nope", "/livez"):
        scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
        asyncio.run(RouteLabels(labelled, routes=app().routes)(scope, None, None))
    assert seen == ["/v2/models/{name}/infer", "/v2/models/abc/infer", UNMATCHED, UNMATCHED, "/livez", "/livez"]


def test_without_a_uvicorn_server_nothing_is_installed() -> None:
    from models import Settings

    assert install(Settings()) is False


def test_a_refusal_is_a_whole_json_response_that_closes() -> None:
    raw = refusal_bytes(431, "too big")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head
    assert f"content-length: {len(body)}".encode() in head and body == b'{"error": "too big"}'


# -- what the service says about itself -------------------------------------------------------------------


def test_redact_keeps_messages_and_drops_paths_urls_and_stacks() -> None:
    assert redact("expected multipart/form-data, got image/jpeg") == "expected multipart/form-data, got image/jpeg"
    assert redact("timm/resnet50 is not served; top_k 1/2") == "timm/resnet50 is not served; top_k 1/2"
    assert redact("[Errno 2] No such file: '/home/u/reg/models/a/spec.json'") == "[Errno 2] No such file: '<path>'"
    assert redact("cannot read ~/x/y and ./rel/p or C:\\Users\\u\\m.onnx") == "cannot read <path> and <path> or <path>"
    assert redact("fetching s3://bucket/prefix/a failed at https://host:9000/x") == "fetching <url> failed at <url>"
    assert redact('boom\nTraceback (most recent call last):\n  File "/x.py", line 1') == "boom"
    assert len(redact("x" * 10_000)) <= 300


@settings(**fuzz_budget(100))
@given(
    st.lists(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8), min_size=1),
    st.text(max_size=30),
)
def test_no_absolute_path_survives_redaction(segments: list[str], around: str) -> None:
    path = "/" + "/".join(segments)
    assert path not in redact(f"{around} {path} {around}") or path in around


def test_the_public_spec_has_what_a_client_needs_and_nothing_else(tiny_registry: Registry) -> None:
    spec = tiny_registry.get("tiny_cnn").spec
    doc = public_spec(spec)
    assert doc["labels"] == spec.labels and doc["feature_dim"] == spec.feature_dim
    assert doc["preprocess"]["crop"] == spec.preprocess.crop and doc["precision"] == spec.precision
    assert not {"files", "source", "training", "parent", "exporter", "verification", "conversion"} & doc.keys()
