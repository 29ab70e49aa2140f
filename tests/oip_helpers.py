"""Requests for the Open Inference Protocol's routes, built by hand where a test needs a body the
real client (tritonclient) would never send."""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

import httpx
from PIL import Image


def infer_url(url: str, model: str, version: str | None = None) -> str:
    return f"{url}/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def bytes_tensor(items: list[bytes]) -> bytes:
    """A BYTES tensor's binary form: a 4-byte little-endian length before each element."""
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def image_request(images: list[bytes], **extra: Any) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body carrying ``images`` as the ``image`` input, and its headers."""
    raw = bytes_tensor(images)
    doc = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [len(images)], "parameters": {"binary_data_size": len(raw)}}
        ],
        **extra,
    }
    return binary_body(doc, raw)


def binary_body(doc: dict[str, Any], binary: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(doc).encode()
    return header + binary, {"Inference-Header-Content-Length": str(len(header))}


def post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 60) -> httpx.Response:
    return httpx.post(url, content=body, headers=headers or {}, timeout=timeout)


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width`` x ``height`` pixels (refused before decoding)."""
    data = bytearray(image_bytes(Image.new("RGB", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)
