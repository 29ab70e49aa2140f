"""A fast reader for the plain multipart/form-data bodies that clients send (curl, requests, httpx).

Starlette's form parser (python-multipart) handles every corner of RFC 7578: quoted-pair escapes,
RFC 2231 parameters, bare-LF line breaks, content-transfer encodings. It feeds bytes through
per-event callbacks and spools each file into a temporary file object: about 0.12 ms of the event
loop's time per upload on the 2-core development machine. Nearly every real request is the plain
form: CRLF line breaks, one ``Content-Disposition: form-data; name="..."[; filename="..."]`` per
part, quoted values without escapes. :func:`read_plain_form` reads exactly that with a few
``bytes.find`` calls. For anything else it returns ``None``, and the caller hands the body to
Starlette, so unusual bodies get the same fields, or the same errors, as before
(tests/test_multipart.py compares the two parsers on generated bodies).
"""

from __future__ import annotations

from dataclasses import dataclass

# Starlette's limits as the service sets them (service/http.py): beyond these it raises an error,
# which the caller's fallback reproduces
MAX_FILES = 1
MAX_FIELDS = 8


@dataclass(frozen=True)
class Part:
    name: str
    value: bytes | str  # bytes for a file part, text for a plain field
    is_file: bool


def boundary_of(content_type: str) -> bytes | None:
    """The boundary parameter of a ``multipart/form-data`` content type, if plainly given."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    found: bytes | None = None
    for param in params.split(";"):
        key, eq, value = param.strip().partition("=")
        if not eq:
            if key:
                return None
            continue
        if key.strip().lower() != "boundary":
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if not value or '"' in value or "\\" in value or found is not None or not value.isascii():
            return None
        found = value.encode("ascii")
    return found


def _disposition(value: bytes) -> tuple[str, str | None] | None:
    """``name`` and ``filename`` of a plain ``form-data`` disposition; None for anything else."""
    kind, *params = value.split(b";")
    if kind.strip().lower() != b"form-data":
        return None
    found: dict[bytes, str] = {}
    for param in params:
        key, eq, raw = param.strip().partition(b"=")
        key = key.strip().lower()
        if not eq or key not in (b"name", b"filename") or key in found:
            return None
        raw = raw.strip()
        if len(raw) < 2 or raw[:1] != b'"' or raw[-1:] != b'"':
            return None
        raw = raw[1:-1]
        if b'"' in raw or b"\\" in raw:
            return None
        try:
            found[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if b"name" not in found:
        return None
    return found[b"name"], found.get(b"filename")


def read_plain_form(body: bytes, content_type: str) -> list[Part] | None:
    """The parts of a plain multipart/form-data body, in order; None where Starlette should decide."""
    boundary = boundary_of(content_type)
    if boundary is None:
        return None
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        return None
    closing = b"\r\n" + delimiter + b"--"
    end = body.rfind(closing)
    if end < 0 or body[end + len(closing) :] not in (b"", b"\r\n"):
        return None
    parts: list[Part] = []
    files = fields = 0
    for chunk in body[len(delimiter) + 2 : end].split(b"\r\n" + delimiter + b"\r\n"):
        if b"\r\n" + delimiter in chunk:  # a delimiter not followed by a line break: malformed
            return None
        head_end = chunk.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        disposition = None
        for line in chunk[:head_end].split(b"\r\n"):
            key, colon, value = line.partition(b":")
            key = key.strip().lower()
            if not colon or not key or line[:1] in b" \t":  # folded or empty header lines
                return None
            if key == b"content-disposition":
                if disposition is not None:
                    return None
                disposition = _disposition(value)
                if disposition is None:
                    return None
            elif key == b"content-transfer-encoding":
                return None
        if disposition is None:
            return None
        name, filename = disposition
        content = chunk[head_end + 4 :]
        if filename is not None:
            files += 1
            parts.append(Part(name, content, True))
        else:
            fields += 1
            try:
                parts.append(Part(name, content.decode("utf-8"), False))
            except UnicodeDecodeError:
                return None
        if files > MAX_FILES or fields > MAX_FIELDS:
            return None
    return parts
