"""The form an image route takes: multipart/form-data with a file field ``image`` and the optional
text fields ``model`` and ``top_k``, read with every limit enforced before anything is decoded."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Receive, Scope

from models.inference import DEFAULT_TOP_K

from .errors import ApiError
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


async def read_body(scope: Scope, receive: Receive, limit: int) -> tuple[bytes, str]:
    """The request's body and content type; 415 for a body that is not a form, 413 beyond ``limit`` bytes
    (refused on the declared length before reading, else as soon as the body outgrows it)."""
    headers = Headers(scope=scope)
    ctype = headers.get("content-type", "")
    if not ctype.lower().startswith(FORM_TYPES):
        got = ctype.split(";")[0] or "no content type"
        raise ApiError(415, f"expected multipart/form-data with a file field '{FILE_FIELD}', got {got}")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared):,} bytes exceeds the limit of {limit:,}")
    body = bytearray()
    async for chunk in Request(scope, receive).stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit:,} bytes")
    return bytes(body), ctype


async def parse_parts(scope: Scope, body: bytes, ctype: str, limit: int) -> list[Part]:
    """The parts of a body already read: the plain form by service/multipart.py, anything else by
    Starlette's parser, whose refusal is a 400."""
    parts = read_plain_form(body, ctype)
    if parts is not None:
        return parts
    request = Request(scope)
    request._body = body  # Starlette parses the body already read
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


async def read_form(scope: Scope, receive: Receive, limit: int) -> ImageForm:
    """The image form of a request whose body may be at most ``limit`` bytes."""
    body, ctype = await read_body(scope, receive, limit)
    return image_form(await parse_parts(scope, body, ctype, limit))
