"""The Open Inference Protocol (KServe v2 REST, Triton's "v2" HTTP API) beside the project's own
routes, so that tritonclient, KServe, perf_analyzer and other OIP clients work unchanged.

``GET /v2``, ``/v2/health/{live,ready}``, ``GET /v2/models/{model}[/versions/{version}][/ready]``
and ``POST .../infer``. ``{model}`` is any reference the service serves (``name``, ``name@alias``,
``name:version``) and ``{version}`` must be the version it serves now (a unique prefix will do).
A request carries one input: ``image`` (BYTES, shape ``[N]`` or ``[N, 1]``: N encoded images,
decoded and preprocessed as ``/classify`` does; base64 strings in JSON) or the model's own input
(FP32 ``[N, 3, crop, crop]``, already preprocessed). Outputs ``logits`` and ``features`` (FP32),
or with ``parameters.classification: k`` on ``logits``, the top k as ``"score:index:label"`` BYTES
strings whose scores are ``/classify``'s softmax probabilities. Bodies are read and written by
service/oip_codec.py (binary tensor data extension included).

Every image of a request takes one of the model's admission places (``queue_limit`` per worker),
goes through the same decode pool, batcher, sessions, hot swap and metrics as ``/classify``
(``protocol="oip"``); more images than ``queue_limit`` in one request can never be admitted: 413.
Errors are ``{"error": ...}`` with the statuses of the rest of the API. Health and readiness
answer 200 with an empty body, or 503 with the reason (the spec's "false"; Kubernetes and load
balancers read any status >= 400 as not ready, tritonclient anything but 200).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope

from models import ImageError, top_k
from models.errors import BackbonesError
from models.spec import VersionSpec

from .batching import OverloadedError
from .drain import Drain
from .http import IMAGE_KINDS_TO_STATUS, TIMEOUT, ApiError
from .metrics import metrics
from .oip_codec import (
    BYTES,
    FP32,
    CodecError,
    InferRequest,
    OutputTensor,
    RequestedOutput,
    byte_elements,
    decompress,
    encode_response,
    fp32_array,
    parse_request,
)
from .pool import ModelPool, ServedModel

log = logging.getLogger(__name__)

PROTOCOL = "oip"  # the ``protocol`` label of these routes' metrics
IMAGE_INPUT = "image"
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX Runtime model
EXTENSIONS = ("binary_tensor_data", "classification")
HEADER_LENGTH = "inference-header-content-length"
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
# OpenTelemetry's excluded_urls entry for the infer routes (service/bento.py), like the image routes'
INFER_URL = r"/v2/models/[^/?]+(/versions/[^/?]+)?/infer(\?|$)"
# JSON larger than this is parsed in the decode pool, off the event loop (an FP32 tensor in JSON)
OFFLOAD_BYTES = 256 * 1024

INFER_ERRORS = {
    400: "malformed body: not JSON, binary lengths that do not add up, an undecodable or truncated image",
    404: "unknown model or version, or one that is not served here",
    413: "request or image too large, or more images than one request may carry",
    415: "a multipart body, an unsupported Content-Encoding or image format",
    422: "a missing or bad field: inputs, datatypes, shapes, outputs, classification",
    503: "overloaded or the model not loaded yet (see Retry-After)",
    **TIMEOUT,
}
MODEL_ERRORS = {404: INFER_ERRORS[404], 503: "the model is not loaded yet", **TIMEOUT}
SERVER_ERRORS = {503: "not ready: draining, or a model not loaded", **TIMEOUT}


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


def server_version() -> str:
    try:
        return importlib.metadata.version("backbones")
    except importlib.metadata.PackageNotFoundError:  # a bento runs the sources, not the package
        return "unknown"


def model_metadata(spec: VersionSpec) -> ModelMetadata:
    chw = [3, spec.preprocess.crop, spec.preprocess.crop]
    return ModelMetadata(
        name=spec.name,
        versions=[spec.version],
        platform=PLATFORM,
        inputs=[
            TensorMetadata(name=IMAGE_INPUT, datatype=BYTES, shape=[-1]),
            TensorMetadata(name=spec.input_name, datatype=FP32, shape=[-1, *chw]),
        ],
        outputs=[
            TensorMetadata(name=spec.outputs[0], datatype=FP32, shape=[-1, spec.num_classes]),
            TensorMetadata(name=spec.outputs[1], datatype=FP32, shape=[-1, spec.feature_dim]),
        ],
    )


@dataclass(frozen=True)
class Job:
    """A request checked against its model: the images (or preprocessed rows) and the outputs."""

    images: list[bytes] | None
    tensor: np.ndarray | None  # (N, 3, crop, crop) when the input is the model's own
    outputs: list[RequestedOutput]
    request_id: str | None

    @property
    def size(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)  # type: ignore[arg-type]


def error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


class OpenInference:
    """The handlers, over the service's model pool, decode pool and drain state."""

    def __init__(self, pool: ModelPool, decode_pool: Executor, drain: Drain) -> None:
        self.pool = pool
        self.settings = pool.settings
        self.decode_pool = decode_pool
        self.drain = drain
        self.metrics = metrics()

    # -- lookup ---------------------------------------------------------------------------

    def served(self, model: str, version: str | None = None) -> ServedModel:
        ref = model.strip()
        # the reference a slot follows is that slot, also while it swaps to where its alias moved
        # (pool.find compares a requested alias with the registry, which moves first)
        slot = next((s for s in self.pool.slots if s.ref == ref), None)
        try:
            slot = slot or self.pool.find(ref)
        except BackbonesError as e:
            raise ApiError(404, f"unknown model {model!r}: {e}") from None
        if slot is None:
            served = ", ".join(s.ref for s in self.pool.slots)
            raise ApiError(404, f"model {model!r} is not served here; served: {served}")
        if slot.current is None:
            raise ApiError(503, f"model {slot.ref} is not loaded yet: {slot.error or 'loading'}", {"Retry-After": "5"})
        current = slot.current.model.spec.version
        if version is not None and not current.startswith(version):
            raise ApiError(404, f"version {version!r} of {slot.name} is not served here; it serves {current}")
        return slot.current

    def not_ready(self) -> str | None:
        """Why the server is not ready (the reasons /readyz gives), or None."""
        if self.drain.draining:
            return "draining"
        if not self.pool.ready:
            reasons = self.pool.not_ready_reasons()
            return "models not loaded: " + ", ".join(f"{ref} ({why})" for ref, why in reasons.items())
        return None

    # -- inference ------------------------------------------------------------------------

    async def read_body(self, scope: Scope, receive: Receive, headers: Headers) -> bytes:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("multipart/"):
            raise ApiError(415, f"expected an inference request (JSON, optionally with binary data), got {ctype}")
        limit = self.settings.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared):,} bytes exceeds the limit of {limit:,}")
        body = bytearray()
        async for chunk in Request(scope, receive).stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit:,} bytes")
        return decompress(bytes(body), headers.get("content-encoding"), limit)

    def check_count(self, n: int) -> None:
        if n == 0:
            raise ApiError(422, "the input's first dimension (the batch) is 0; send at least one image")
        if n > self.settings.queue_limit:
            raise ApiError(
                413, f"{n:,} images in one request; at most {self.settings.queue_limit} (queue_limit) per request"
            )

    def job(self, body: bytes, header_length: str | None, spec: VersionSpec) -> Job:
        """Parse the body and check it against ``spec``: exactly one input, known outputs."""
        request = parse_request(body, header_length)
        if len(request.inputs) != 1:
            names = [t.name for t in request.inputs]
            raise ApiError(422, f"send exactly one input, {IMAGE_INPUT!r} or {spec.input_name!r}; got {names}")
        (tensor,) = request.inputs
        outputs = self.requested(request, spec)
        if tensor.name == IMAGE_INPUT:
            if tensor.datatype != BYTES or len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ((), (1,)):
                raise ApiError(
                    422,
                    f"input {IMAGE_INPUT!r} is BYTES of shape [N] or [N, 1], got {tensor.datatype} {list(tensor.shape)}",
                )
            self.check_count(tensor.shape[0])
            return Job(byte_elements(tensor), None, outputs, request.id)
        if tensor.name == spec.input_name:
            chw = (3, spec.preprocess.crop, spec.preprocess.crop)
            if tensor.datatype != FP32 or len(tensor.shape) != 4 or tensor.shape[1:] != chw:
                raise ApiError(
                    422,
                    f"input {spec.input_name!r} is FP32 of shape [N, {', '.join(map(str, chw))}] (preprocessed as "
                    f"{spec.tag}'s spec says), got {tensor.datatype} {list(tensor.shape)}",
                )
            self.check_count(tensor.shape[0])
            return Job(None, fp32_array(tensor), outputs, request.id)
        raise ApiError(
            422, f"unknown input {tensor.name!r}; accepted: {IMAGE_INPUT!r} (BYTES) or {spec.input_name!r} (FP32)"
        )

    @staticmethod
    def requested(request: InferRequest, spec: VersionSpec) -> list[RequestedOutput]:
        if request.outputs is None:
            return [RequestedOutput(name, request.binary_output) for name in spec.outputs]
        for out in request.outputs:
            if out.name not in spec.outputs:
                raise ApiError(422, f"unknown output {out.name!r}; known: {', '.join(spec.outputs)}")
            k = out.classification
            if k is not None:
                if out.name != spec.outputs[0]:
                    raise ApiError(422, f"classification is for the {spec.outputs[0]!r} output, not {out.name!r}")
                if not 1 <= k <= spec.num_classes:
                    raise ApiError(
                        422, f"classification must be between 1 and {spec.num_classes} (the classes), got {k}"
                    )
        return request.outputs

    async def decode(self, served: ServedModel, images: list[bytes]) -> list[np.ndarray]:
        loader, name = served.model.loader, served.model.spec.name

        def timed(data: bytes) -> tuple[np.ndarray, float]:
            start = time.perf_counter()
            return loader(data), time.perf_counter() - start

        loop = asyncio.get_running_loop()
        done = await asyncio.gather(
            *(loop.run_in_executor(self.decode_pool, timed, data) for data in images), return_exceptions=True
        )
        arrays = []
        for i, result in enumerate(done):
            if isinstance(result, ImageError):
                where = f"image {i + 1} of {len(images)}: " if len(images) > 1 else ""
                raise ApiError(IMAGE_KINDS_TO_STATUS.get(result.kind, 400), f"{where}{result}")
            if isinstance(result, BaseException):
                raise result
            arrays.append(result[0])
            self.metrics.decode_seconds.labels(name).observe(result[1])
        return arrays

    async def compute(self, served: ServedModel, job: Job) -> tuple[np.ndarray, np.ndarray]:
        """Logits and features of every image, through the model's admission and batcher."""
        batcher, name = served.batcher, served.model.spec.name
        admitted = 0
        try:
            try:
                for _ in range(job.size):
                    batcher.admit()
                    admitted += 1
            except OverloadedError as e:
                raise ApiError(
                    503, "overloaded: too many requests in flight", {"Retry-After": str(int(e.retry_after))}
                ) from None
            self.metrics.inflight.labels(name).inc()
            try:
                rows = await self.decode(served, job.images) if job.images is not None else list(job.tensor)  # type: ignore[arg-type]
                results = await asyncio.gather(*(batcher.infer(row) for row in rows), return_exceptions=True)
            finally:
                self.metrics.inflight.labels(name).dec()
        finally:
            for _ in range(admitted):
                batcher.release()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return np.stack([r[0] for r in results]), np.stack([r[1] for r in results])  # type: ignore[index]

    def tensors(self, job: Job, spec: VersionSpec, logits: np.ndarray, features: np.ndarray) -> list[OutputTensor]:
        by_name = dict(zip(spec.outputs, (logits, features), strict=True))
        out = []
        for requested in job.outputs:
            values = by_name[requested.name]
            k = requested.classification
            if k is None:
                out.append(OutputTensor(requested.name, FP32, list(values.shape), values, requested.binary))
                continue
            rows = top_k(values, spec.labels, k)
            for row in rows:
                self.metrics.top1_confidence.labels(spec.name, spec.version).observe(row[0].score)
            strings = [f"{p.score}:{p.index}:{p.label}" for row in rows for p in row]
            out.append(OutputTensor(requested.name, BYTES, [len(rows), k], strings, requested.binary))
        return out

    def count(self, served: ServedModel | None, outcome: str) -> None:
        spec = served.model.spec if served else None
        self.metrics.requests.labels(
            endpoint="infer",
            model=spec.name if spec else "",
            version=spec.version if spec else "",
            outcome=outcome,
            protocol=PROTOCOL,
        ).inc()

    async def infer(self, scope: Scope, receive: Receive, model: str, version: str | None) -> Response:
        """The response to ``POST .../infer``: the outputs, or a client mistake's ``{"error": ...}``."""
        served = None
        try:
            headers = Headers(scope=scope)
            body = await self.read_body(scope, receive, headers)
            served = self.served(model, version)
            spec = served.model.spec
            header_length = headers.get(HEADER_LENGTH)
            if header_length is None and len(body) > OFFLOAD_BYTES:
                loop = asyncio.get_running_loop()
                job = await loop.run_in_executor(self.decode_pool, self.job, body, header_length, spec)
            else:
                job = self.job(body, header_length, spec)
            logits, features = await self.compute(served, job)
        except CodecError as e:
            self.count(served, "client_error")
            return error(ApiError(e.status, e.message))
        except ApiError as e:
            self.count(served, "overloaded" if e.status == 503 else "client_error")
            return error(e)
        except ClientDisconnect:
            raise
        except Exception:
            self.count(served, "error")
            raise
        self.count(served, "ok")
        payload, json_length = encode_response(
            spec.name, spec.version, job.request_id, self.tensors(job, spec, logits, features)
        )
        if json_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(json_length)},
        )
