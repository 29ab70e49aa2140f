"""The form an image route takes: multipart/form-data with a file field ``image`` and the optional
text fields ``model`` and ``top_k``, read with every limit enforced before anything is decoded."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope

from models.inference import DEFAULT_TOP_K

from .errors import ApiError
from .limits import Reservation
from .multipart import Part, read_plain_form, starlette_parts

FILE_FIELD = "image"
TEXT_FIELDS = ("model", "top_k")
FORM_FIELDS = (FILE_FIELD, *TEXT_FIELDS)
# a urlencoded form cannot carry a file, but is parsed so that its fields get a precise 422
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG, PNG, GIF, WebP, BMP or TIFF",
                        },
                        "model": {
                            "type": "string",
                            "description": "name, name:version or name@alias (default: the first served model)",
                        },
                        "top_k": {
                            "type": "integer",
                            "minimum": 1,
                            "default": DEFAULT_TOP_K,
                            "description": "classify only",
                        },
                    },
                }
            }
        },
    },
}


@dataclass(frozen=True)
class ImageForm:
    """The uploaded image and the raw text fields (None where absent)."""

    image: bytes
    model: str | None = None
    top_k: str | None = None


@dataclass(frozen=True)
class Head:
    """What a request's headers say about its body."""

    content_type: str
    declared: int | None  # Content-Length; None for a chunked body


def read_head(scope: Scope, limit: int) -> Head:
    """The body's content type and declared length; 415 for a body that is not a form, 413 for a
    declared length over ``limit`` bytes. Nothing is read."""
    headers = Headers(scope=scope)
    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith(FORM_TYPES):
        got = ctype.split(";")[0] or "no content type"
        raise ApiError(415, f"expected multipart/form-data with a file field '{FILE_FIELD}', got {got}")
    raw = headers.get("content-length")
    declared = int(raw) if raw is not None and raw.isdigit() else None  # the HTTP parser refuses other values
    if declared is not None and declared > limit:
        raise ApiError(413, f"request body of {declared:,} bytes exceeds the limit of {limit:,}")
    return Head(ctype, declared)


async def read_body(
    scope: Scope, receive: Receive, limit: int, reservation: Reservation | None = None, head: Head | None = None
) -> tuple[bytearray, str]:
    """The request's body and content type (refusals as :func:`read_head`; a body without a
    declared length is refused with 413 as soon as it outgrows ``limit``). A declared body is
    received into one buffer of its size; an undeclared one grows ``reservation`` as it arrives."""
    head = head or read_head(scope, limit)
    body = bytearray(head.declared or 0)
    received = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if head.declared is not None:
            if received + len(chunk) > head.declared:
                raise ApiError(400, f"request body longer than its Content-Length of {head.declared:,}")
            body[received : received + len(chunk)] = chunk
        else:
            if received + len(chunk) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit:,} bytes")
            if reservation is not None:
                reservation.grow(len(chunk))
            body += chunk
        received += len(chunk)
    if head.declared is not None and received < head.declared:
        raise ApiError(400, f"request body ended after {received:,} of its {head.declared:,} declared bytes")
    return body, head.content_type


async def parse_parts(scope: Scope, body: bytes | bytearray, ctype: str, limit: int) -> list[Part]:
    """The parts of a body already read: the plain form by service/multipart.py, anything else by
    Starlette's parser, whose refusal is a 400."""
    parts = read_plain_form(body, ctype)
    if parts is not None:
        return parts
    request = Request(scope)
    request._body = bytes(body)  # Starlette parses the body already read
    try:
        return await starlette_parts(request, max_part_size=limit)
    except Exception as e:  # malformed multipart
        raise ApiError(400, f"malformed multipart body: {e}") from None


def image_form(parts: list[Part]) -> ImageForm:
    """The form these parts make, or a 422 naming the missing, unknown or misused field. A repeated
    field: the last one counts, as in Starlette."""
    fields = {p.name: p for p in parts}
    unknown = set(fields) - set(FORM_FIELDS)
    image = fields.get(FILE_FIELD)
    if image is None:
        hint = f" (got fields: {', '.join(sorted(unknown))})" if unknown else ""
        raise ApiError(422, f"missing file field '{FILE_FIELD}'{hint}")
    if not image.is_file:
        raise ApiError(422, f"field '{FILE_FIELD}' must be an uploaded file, not text (URLs are never fetched)")
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(sorted(unknown))}; accepted: {', '.join(FORM_FIELDS)}")
    text: dict[str, str] = {}
    for name in TEXT_FIELDS:
        part = fields.get(name)
        if part is not None:
            if not isinstance(part.value, str):
                raise ApiError(422, f"field {name!r} must be text, not a file")
            text[name] = part.value
    data = image.value if isinstance(image.value, bytes) else image.value.encode()
    return ImageForm(data, model=text.get("model"), top_k=text.get("top_k"))


async def read_form(
    scope: Scope, receive: Receive, limit: int, reservation: Reservation | None = None, head: Head | None = None
) -> ImageForm:
    """The image form of a request whose body may be at most ``limit`` bytes. The body is dropped
    once parsed: the form holds the one copy of the image that the decoder reads."""
    body, ctype = await read_body(scope, receive, limit, reservation, head)
    return image_form(await parse_parts(scope, body, ctype, limit))
