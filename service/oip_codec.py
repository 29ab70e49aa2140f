"""The bodies of the Open Inference Protocol's (KServe v2) ``POST .../infer``: reading a request and
writing a response, with the binary tensor data extension (Triton's, which tritonclient uses by
default) and request compression. Pure functions over bytes and JSON: no HTTP, no model.

Binary tensor data: the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed
by the raw tensors of the inputs that carry ``parameters.binary_data_size``, in input order. FP32
is little-endian; a BYTES tensor is its elements one after the other, each a 4-byte little-endian
length and that many bytes. A response does the same for the outputs asked for in binary.

Every way a body can be wrong raises :class:`CodecError` with the status the service answers:
400 for a body that is not what it declares (bad JSON, lengths that do not add up, truncated
elements), 422 for a well-formed request with a bad field, 413 and 415 for compression.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FP32 = "FP32"
BYTES = "BYTES"
MAX_DIMS = 8  # the service's tensors have at most 4; a longer shape is a mistake
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix
_DIGITS = re.compile(r"[0-9]{1,12}")
_ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib wbits: gzip wrapper, zlib wrapper


class CodecError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any = None  # the JSON ``data`` (nested or flat), when the tensor is not binary
    raw: bytes | None = None  # its slice of the binary section, when it is

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int | None = None  # top-k as "score:index:label" strings instead of the tensor


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool  # ``parameters.binary_data_output``: the default for every output


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[str]  # an FP32 array, or the strings of a BYTES tensor (row-major)
    binary: bool


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` as sent with ``Content-Encoding: encoding`` (gzip, deflate or none), at most
    ``limit`` bytes once expanded."""
    name = (encoding or "").strip().lower()
    if name in ("", "identity"):
        return body
    wbits = _ENCODINGS.get(name)
    if wbits is None:
        raise CodecError(415, f"unsupported Content-Encoding {encoding!r}; accepted: gzip, deflate, identity")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise CodecError(400, f"the {name} body cannot be decompressed: {e}") from None
    if len(out) > limit:
        raise CodecError(413, f"the decompressed request body exceeds the limit of {limit:,} bytes")
    if not inflater.eof or inflater.unused_data:
        raise CodecError(400, f"the {name} body is truncated or has data after its end")
    return out


def _fail(message: str) -> CodecError:
    return CodecError(422, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _flag(params: dict[str, Any], key: str, what: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"{what} parameter {key!r} must be true or false, got {value!r}")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in value):
        raise _fail(f"{what} 'shape' must be a list of at most {MAX_DIMS} non-negative integers, got {value!r:.80}")
    return tuple(value)


def _inputs(value: Any) -> list[tuple[dict[str, Any], InputTensor]]:
    if not isinstance(value, list) or not value:
        raise _fail("'inputs' must be a non-empty list of tensors")
    out = []
    for i, item in enumerate(value):
        tensor = _object(item, f"input {i}")
        name, datatype = tensor.get("name"), tensor.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise _fail(f"input {i} needs a string 'name' and a string 'datatype'")
        what = f"input {name!r}"
        params = _object(tensor.get("parameters"), f"{what} 'parameters'")
        size = params.get("binary_data_size")
        if size is not None and (not _is_int(size) or size < 0):
            raise _fail(f"{what} 'binary_data_size' must be a non-negative integer, got {size!r:.40}")
        if (size is None) == ("data" not in tensor):
            raise _fail(f"{what} needs either 'data' or parameters.binary_data_size, not both or neither")
        out.append((params, InputTensor(name, datatype, _shape(tensor.get("shape"), what), tensor.get("data"))))
    names = [t.name for _, t in out]
    if len(set(names)) != len(names):
        raise _fail(f"an input is named twice: {names}")
    return out


def _outputs(value: Any, binary_default: bool) -> list[RequestedOutput] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise _fail("'outputs' must be a list")
    out = []
    for i, item in enumerate(value):
        tensor = _object(item, f"output {i}")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise _fail(f"output {i} needs a string 'name'")
        params = _object(tensor.get("parameters"), f"output {name!r} 'parameters'")
        k = params.get("classification")
        if k is not None and not _is_int(k):
            raise _fail(f"output {name!r}: 'classification' must be an integer (the k of top-k), got {k!r:.40}")
        out.append(RequestedOutput(name, _flag(params, "binary_data", f"output {name!r}", binary_default), k))
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise _fail(f"an output is asked for twice: {names}")
    return out


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary section after it."""
    if header_length is None:
        return body, b""
    if not _DIGITS.fullmatch(header_length.strip()):
        raise CodecError(
            400, f"Inference-Header-Content-Length must be a non-negative integer, got {header_length!r:.40}"
        )
    n = int(header_length.strip())
    if n > len(body):
        raise CodecError(400, f"Inference-Header-Content-Length is {n:,} but the body has only {len(body):,} bytes")
    return body[:n], body[n:]


def parse_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """An inference request; ``header_length`` is the ``Inference-Header-Content-Length`` header."""
    header, binary = _split(body, header_length)
    try:
        doc = json.loads(header)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CodecError(400, f"the inference request is not valid JSON: {str(e)[:120]}") from None
    doc = _object(doc, "the inference request")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail(f"'id' must be a string, got {request_id!r:.40}")
    params = _object(doc.get("parameters"), "'parameters'")
    binary_output = _flag(params, "binary_data_output", "request", False)
    inputs, offset = [], 0
    for tensor_params, tensor in _inputs(doc.get("inputs")):
        size = tensor_params.get("binary_data_size")
        if size is not None:
            if header_length is None:
                raise CodecError(
                    400, f"input {tensor.name!r} has binary data but Inference-Header-Content-Length is missing"
                )
            if offset + size > len(binary):
                raise CodecError(
                    400,
                    f"input {tensor.name!r} declares {size:,} binary bytes but only {len(binary) - offset:,} remain",
                )
            tensor = InputTensor(tensor.name, tensor.datatype, tensor.shape, raw=binary[offset : offset + size])
            offset += size
        inputs.append(tensor)
    if offset != len(binary):
        raise CodecError(400, f"the binary section has {len(binary):,} bytes but the inputs declare {offset:,}")
    return InferRequest(request_id, inputs, _outputs(doc.get("outputs"), binary_output), binary_output)


def json_elements(data: Any, shape: Sequence[int], what: str) -> list[Any]:
    """The elements of JSON tensor ``data`` in row-major order: a flat list of ``prod(shape)``
    elements, or lists nested exactly as ``shape``."""
    if not isinstance(data, list):
        raise _fail(f"{what} 'data' must be a list")
    if len(data) == math.prod(shape) and not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []

    def walk(node: Any, dims: Sequence[int]) -> None:
        if not dims:
            if isinstance(node, list):
                raise _fail(f"{what} 'data' is nested deeper than its shape {list(shape)}")
            out.append(node)
            return
        if not isinstance(node, list) or len(node) != dims[0]:
            raise _fail(f"{what} 'data' is neither flat with {math.prod(shape)} elements nor nested as {list(shape)}")
        for child in node:
            walk(child, dims[1:])

    walk(data, shape)
    return out


def byte_elements(tensor: InputTensor) -> list[bytes]:
    """The elements of a BYTES tensor: from the binary section, or from JSON where each element is
    a base64 string (raw bytes cannot travel in JSON)."""
    what = f"input {tensor.name!r}"
    if tensor.raw is None:
        items = []
        for i, value in enumerate(json_elements(tensor.data, tensor.shape, what)):
            if not isinstance(value, str):
                raise _fail(f"{what} element {i} must be a base64 string, got {type(value).__name__}")
            try:
                items.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise _fail(f"{what} element {i} is not valid base64") from None
        return items
    raw, items, pos = tensor.raw, [], 0
    while pos < len(raw):
        if len(raw) - pos < _LENGTH.size:
            raise CodecError(400, f"{what}: element {len(items)} has a truncated 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(raw, pos)
        pos += _LENGTH.size
        if length > len(raw) - pos:
            raise CodecError(
                400, f"{what}: element {len(items)} declares {length:,} bytes but {len(raw) - pos:,} remain"
            )
        items.append(raw[pos : pos + length])
        pos += length
        if len(items) > tensor.count:
            raise CodecError(400, f"{what}: the binary data holds more than the {tensor.count} elements of its shape")
    if len(items) != tensor.count:
        raise CodecError(
            400,
            f"{what}: the binary data holds {len(items)} elements, its shape {list(tensor.shape)} says {tensor.count}",
        )
    return items


def fp32_array(tensor: InputTensor) -> np.ndarray:
    """An FP32 tensor as a float32 array of its shape; NaN and infinities are refused."""
    what = f"input {tensor.name!r}"
    if tensor.raw is not None:
        if len(tensor.raw) != 4 * tensor.count:
            raise CodecError(
                400,
                f"{what}: {len(tensor.raw):,} bytes of binary data; FP32 of shape {list(tensor.shape)} is {4 * tensor.count:,}",
            )
        array = np.frombuffer(tensor.raw, dtype="<f4").reshape(tensor.shape)
    else:
        try:
            values = np.array(tensor.data)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise _fail(f"{what} 'data' must be numbers nested as its shape {list(tensor.shape)}") from None
        if values.dtype.kind not in "iuf":
            raise _fail(f"{what} 'data' must hold only numbers")
        if values.ndim == 1 and values.size == tensor.count:
            values = values.reshape(tensor.shape)
        elif values.shape != tensor.shape:
            raise _fail(f"{what} 'data' is neither flat with {tensor.count} numbers nor nested as {list(tensor.shape)}")
        with np.errstate(over="ignore"):
            array = values.astype(np.float32)
    if not np.isfinite(array).all():
        raise _fail(f"{what} holds NaN or infinite values")
    return array


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """A BYTES tensor's binary form: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def encode_response(
    model_name: str, model_version: str, request_id: str | None, outputs: Sequence[OutputTensor]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it (the value of
    ``Inference-Header-Content-Length``; None when the body is all JSON)."""
    entries, blobs = [], []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.binary:
            if isinstance(out.values, np.ndarray):
                blob = np.ascontiguousarray(out.values, dtype="<f4").tobytes()
            else:
                blob = serialize_bytes([s.encode() for s in out.values])
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.values.ravel().tolist() if isinstance(out.values, np.ndarray) else list(out.values)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
