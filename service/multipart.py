"""A fast reader for the plain multipart/form-data bodies that clients send (curl, requests, httpx).

Starlette's form parser (python-multipart) handles every corner of RFC 7578: quoted-pair escapes,
RFC 2231 parameters, bare-LF line breaks, content-transfer encodings. It feeds bytes through
per-event callbacks and spools each file into a temporary file object, all on the event loop
(its cost per upload: docs/benchmarks.md). Nearly every real request is the plain
form: CRLF line breaks, one ``Content-Disposition: form-data; name="..."[; filename="..."]`` per
part, quoted values without escapes. :func:`read_plain_form` reads exactly that with a few
``bytes.find`` calls. For anything else it returns ``None``, and the caller hands the body to
Starlette, so unusual bodies get the same fields, or the same errors, as before
(tests/test_multipart.py compares the two parsers on generated bodies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.requests import Request

# Starlette's limits as the service sets them (starlette_parts): beyond these it raises an error,
# which the caller's fallback reproduces
MAX_FILES = 1
MAX_FIELDS = 8
# python-multipart's own limits on a part's headers; the plain form stays well inside them
MAX_HEADERS = 8
MAX_HEADER_LINE = 4096

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP header or parameter name
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046
_PRINTABLE = re.compile(r"[\t\x20-\x7e]*")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_UNSAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f-\xff]")  # controls and obs-text


@dataclass(frozen=True)
class Part:
    name: str
    value: bytes | str  # bytes for a file part, text for a plain field
    is_file: bool


def _unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a plain ``multipart/form-data`` content type (parameters ``boundary`` and
    optionally ``charset=utf-8``, printable ASCII only); None for anything else."""
    if not _PRINTABLE.fullmatch(content_type):
        return None
    kind, _, params = content_type.partition(";")
    if kind.strip(" \t").lower() != "multipart/form-data":
        return None
    found: bytes | None = None
    for param in params.split(";"):
        key, eq, value = param.strip(" \t").partition("=")
        key, value = key.strip(" \t").lower(), _unquote(value.strip(" \t"))
        if not eq:
            if key:
                return None
        elif key == "charset":
            if value.lower() not in ("utf-8", "utf8"):  # Starlette decodes fields with the charset
                return None
        elif key != "boundary" or found is not None or not _BOUNDARY.fullmatch(value):
            return None
        else:
            found = value.encode("ascii")
    return found


def _disposition(value: bytes) -> tuple[str, str | None] | None:
    """``name`` and ``filename`` of a plain ``form-data`` disposition; None for anything else."""
    kind, *params = value.split(b";")
    if kind.strip(b" \t").lower() != b"form-data":
        return None
    found: dict[bytes, str] = {}
    for param in params:
        key, eq, raw = param.strip(b" \t").partition(b"=")
        key = key.strip(b" \t").lower()
        if not eq or key not in (b"name", b"filename") or key in found:
            return None
        raw = raw.strip(b" \t")
        if len(raw) < 2 or raw[:1] != b'"' or raw[-1:] != b'"':
            return None
        raw = raw[1:-1]
        if b'"' in raw or b"\\" in raw or _CONTROL.search(raw):
            return None
        try:
            found[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if b"name" not in found:
        return None
    return found[b"name"], found.get(b"filename")


def _plain_part(body: bytes | bytearray, start: int, end: int, delimiter: bytes) -> Part | None:
    """The part in ``body[start:end]`` (its headers, a blank line, its content); None where it is
    not plain. Its header lines are counted before they are split, and only its content is copied."""
    if body.find(b"\r\n" + delimiter, start, end) >= 0:  # a delimiter not followed by a line break
        return None
    head_end = body.find(b"\r\n\r\n", start, end)
    if head_end < 0 or body.count(b"\r\n", start, head_end) >= MAX_HEADERS:
        return None
    if head_end - start > MAX_HEADERS * (MAX_HEADER_LINE + 2):
        return None
    disposition = None
    for line in bytes(body[start:head_end]).split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if not colon or len(line) > MAX_HEADER_LINE or not _TOKEN.fullmatch(key):
            return None  # empty, folded, overlong or oddly named header lines
        key = key.lower()
        if key == b"content-disposition":
            if disposition is not None:
                return None
            # outside its quoted name and filename, only printable ASCII
            outside = re.sub(rb'"[^"]*"', b"", value)
            disposition = None if _UNSAFE_VALUE.search(outside) else _disposition(value)
            if disposition is None:
                return None
        elif key == b"content-transfer-encoding" or _UNSAFE_VALUE.search(value):
            return None
    if disposition is None:
        return None
    name, filename = disposition
    content = bytes(memoryview(body)[head_end + 4 : end])
    if filename is not None:
        return Part(name, content, True)
    try:
        return Part(name, content.decode("utf-8"), False)
    except UnicodeDecodeError:
        return None


def read_plain_form(body: bytes | bytearray, content_type: str) -> list[Part] | None:
    """The parts of a plain multipart/form-data body, in order; None where Starlette should decide.

    The parts are counted before any is cut out, so a body of a million tiny parts costs one scan."""
    boundary = boundary_of(content_type)
    if boundary is None:
        return None
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        return None
    closing = b"\r\n" + delimiter + b"--"
    end = body.rfind(closing)
    tail = len(body) - end - len(closing)
    if end < 0 or tail not in (0, 2) or (tail == 2 and not body.endswith(b"\r\n")):
        return None
    separator = b"\r\n" + delimiter + b"\r\n"
    start = len(delimiter) + 2
    if body.count(separator, start, end) >= MAX_FILES + MAX_FIELDS:
        return None
    parts: list[Part] = []
    files = fields = 0
    while True:
        found = body.find(separator, start, end)
        part = _plain_part(body, start, end if found < 0 else found, delimiter)
        if part is None:
            return None
        parts.append(part)
        files, fields = files + part.is_file, fields + (not part.is_file)
        if files > MAX_FILES or fields > MAX_FIELDS:
            return None
        if found < 0:
            return parts
        start = found + len(separator)


async def starlette_parts(request: Request, *, max_part_size: int = 1024 * 1024) -> list[Part]:
    """The parts as Starlette's parser (python-multipart) reads the request's body, with the
    service's limits; raises what Starlette raises for a body it refuses."""
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=max_part_size)
    return [
        Part(k, await v.read(), True) if isinstance(v, UploadFile) else Part(k, v, False) for k, v in form.multi_items()
    ]
