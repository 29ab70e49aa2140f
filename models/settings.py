"""The one typed entry point for configuration. Nothing else in the project reads ``os.environ``.

Every field can be set from the environment as ``BACKBONES_<FIELD>`` (for example
``BACKBONES_PROVIDERS=cpu``); the registry location is BentoML's own ``BENTOML_HOME``.
:meth:`Settings.env_name` gives a field's variable, so no other module spells one out. Knobs of
the test suite alone live with the tests (tests/conftest.py ``TestHooks``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ProviderChoice = Literal["auto", "cpu", "cuda", "tensorrt"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BACKBONES_", extra="ignore")

    bentoml_home: Path | None = Field(
        default=None,
        validation_alias="BENTOML_HOME",
        description="Registry root (BentoML's home). Unset: BentoML's default, ~/bentoml.",
    )
    torch_home: Path | None = Field(
        default=None, validation_alias="TORCH_HOME", description="torchvision's weight cache root (torch.hub)."
    )
    xdg_cache_home: Path | None = Field(default=None, validation_alias="XDG_CACHE_HOME")
    registry_url: str | None = Field(
        default=None,
        description="A registry in object storage (s3://bucket/prefix, file:///path, another fsspec URL): "
        "the source of truth for `models list|show|alias|delete|push|pull`, with the local store as its "
        "verified cache. Credentials: the AWS environment, profiles or roles (AWS_ENDPOINT_URL for MinIO).",
    )
    providers: ProviderChoice = Field(
        default="auto",
        description="ONNX Runtime execution providers: auto = TensorRT, then CUDA, then CPU, "
        "as far as they are installed and a GPU driver is present.",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime threads per session; 0 = one per available core."
    )
    intra_op_spinning: bool = Field(
        default=False,
        description="Let idle ONNX Runtime threads busy-wait for work. Off: measured faster wherever "
        "decoding shares the cores with inference.",
    )
    cuda_tf32: bool = Field(
        default=True,
        description="CUDA: let FP32 models use TF32 tensor cores for convolutions and matrix products "
        "(PyTorch's default for convolutions; same top-1, logits a little further from the CPU's). "
        "Off: full FP32 arithmetic, closer to the CPU, slower.",
    )
    trt_fp16: bool = Field(default=True, description="Let TensorRT build FP16 engines.")
    trt_cache_dir: Path | None = Field(
        default=None,
        description="TensorRT engine and timing caches. Unset: <registry root>/backbones/trt-cache.",
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Images declaring more pixels are refused before they are decoded (decompression bombs).",
    )
    # -- serving (service/) ------------------------------------------------------------------
    serve_models: str = Field(
        default="efficientnet_lite0",
        description="Comma-separated model references the HTTP service loads; the first is the default.",
    )
    max_request_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="Larger request bodies get 413.")
    max_batch_size: int = Field(
        default=0,
        ge=0,
        description="Most images in one ONNX Runtime call. 0 = measured when a model loads: the "
        "smallest batch whose images/s is close to the best (service/batching.py calibrate_batch_size; "
        "on a CPU often 1, on a GPU larger). Requests that queue while every runner is busy form the "
        "next batch; there is no waiting window, so a lone request runs at once.",
    )
    workers: int = Field(
        default=0,
        ge=0,
        description="Server worker processes. 0 = as models.runtime.serving_plan lays them out: one per "
        "available core, on a GPU machine too (capped there: each worker holds a CUDA context and "
        "sessions of its own). On a CPU each worker may use every core, whichever worker the "
        "connections land on.",
    )
    runners: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime calls one served model runs at once in each worker. 0 = one per "
        "available core on a CPU (each on one intra-op thread), 1 on a GPU.",
    )
    queue_limit: int = Field(
        default=128,
        ge=1,
        description="Requests admitted per model (decoding, queued or running); more get 503 with Retry-After.",
    )
    decode_threads: int = Field(
        default=0,
        ge=0,
        description="Threads decoding uploads in each worker; 0 = one per available core on a CPU, "
        "the worker's share of the cores with a GPU.",
    )
    access_log: bool = Field(
        default=False,
        description="Log one line per request (BentoML's access log). Off by default: at hundreds of "
        "requests/s it costs CPU that inference needs; /metrics counts every request by outcome.",
    )
    trace_requests: bool = Field(
        default=False,
        description="OpenTelemetry spans for /classify and /embed (BentoML's tracing, exported where "
        "its tracing configuration says). Off by default: the span machinery costs CPU on every "
        "request even when nothing is sampled (docs/benchmarks.md); the other routes are traced either way.",
    )
    swap_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often the service checks whether a followed alias has moved."
    )
    draft_decoding: bool = Field(
        default=False,
        description="Let the JPEG decoder downscale large photos while decoding: much faster decoding "
        "of multi-megapixel photos, but logits move far beyond the export's parity tolerance "
        "(docs/benchmarks.md), so it is off unless asked for.",
    )

    # -- faults and shutdown (service/drain.py); deploy/ sizes the pod's grace period from these --
    drain_delay_seconds: float = Field(
        default=3.0,
        ge=0,
        description='After SIGTERM, how long /readyz answers 503 ("draining") while new requests are '
        "still served, so load balancers stop routing here before the listener closes.",
    )
    drain_seconds: float = Field(
        default=30.0,
        gt=0,
        description="After SIGTERM and the drain delay, the longest in-flight requests get to finish "
        "before the process exits.",
    )
    request_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A request not answered within this time gets 504 (a stuck model never holds a client forever).",
    )
    load_retry_max_seconds: float = Field(
        default=30.0,
        ge=0,
        description="A served model that fails to load at start-up is retried with backoff up to this "
        "interval; meanwhile /readyz answers 503 with the reason and /livez 200.",
    )
    # -- hostile traffic (service/transport.py, service/limits.py, service/auth.py) --------------
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="Comma-separated API keys. When set (or api_keys_file is), every route but "
        "auth_open_paths needs the header 'Authorization: Bearer <key>'; unset: no authentication. "
        "Keys are never logged.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of API keys as SHA-256 hex digests, one per line ('#' starts a comment), "
        "read when the service starts; with api_keys, either kind of key is accepted.",
    )
    auth_open_paths: str = Field(
        default="/livez,/readyz,/metrics,/v2/health/live,/v2/health/ready",
        description="Comma-separated paths answered without a key when authentication is on "
        "(the probes, the Open Inference Protocol's health routes that KServe probes, and the "
        "Prometheus scrape).",
    )
    max_connections: int = Field(
        default=512,
        ge=1,
        description="Open connections per worker; a request on a connection beyond them gets 503 "
        "with Retry-After, and the connection is closed.",
    )
    receive_budget_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="Bytes of request bodies a worker holds at once (being received, parsed or "
        "decoded), reserved from the declared length before a byte is read; a body that does not "
        "fit gets an immediate 503 with Retry-After. Bodies larger than an eighth of it may hold "
        "at most half of it together, so ordinary photos always find room. At least twice "
        "max_request_bytes.",
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A request's line and headers must arrive within this time of its first byte "
        "(of the connection's opening, for a new connection); else 408 and the connection is closed.",
    )
    max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description="Most bytes of a request's line and headers together; more gets 431 and the connection is closed.",
    )
    max_headers: int = Field(
        default=64, ge=8, description="Most header lines in a request; more gets 431 and the connection is closed."
    )
    # -- artifact safety (models/preflight.py) --------------------------------------------------
    preflight_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="An ONNX file is loaded and run once in a subprocess before it is registered or "
        "served; a load that crashes or runs longer than this is refused.",
    )
    # -- precision (models/quantize.py, models/fp16.py, models/runtime.py) -----------------------
    quantize_min_agreement: float = Field(
        default=0.98,
        gt=0,
        le=1,
        description="Default top-1 agreement an INT8 or FP16 version must reach with its FP32 parent on "
        "held-out photos to be registered (`backbones export --min-agreement` overrides it).",
    )
    trt_profile_batches: str = Field(
        default="",
        pattern=r"^\s*(\d+\s*(,\s*\d+\s*){0,2})?$",
        description="TensorRT optimization profile as batch sizes MIN,OPT,MAX (e.g. 1,8,32; MIN must be 1, "
        "since the service and embed jobs send any batch from 1 up; one number N: 1..N, tuned for N). "
        "Larger batches are run in chunks of MAX. Empty: TensorRT builds an engine for each new "
        "batch shape it sees.",
    )
    io_binding: bool = Field(
        default=True,
        description="On CUDA/TensorRT, run through ONNX Runtime's IO binding (outputs allocated once "
        "per shape by ONNX Runtime and copied back once) instead of plain run().",
    )

    @field_validator("trt_profile_batches")
    @classmethod
    def _increasing_batches(cls, value: str) -> str:
        sizes = _batch_sizes(value)
        if any(s < 1 for s in sizes) or sizes != sorted(sizes):
            raise ValueError(f"batch sizes must be positive and increasing (MIN,OPT,MAX), got {value!r}")
        if len(sizes) > 1 and sizes[0] != 1:
            raise ValueError(
                f"the smallest batch of the profile must be 1 (a lone request is a batch of 1), got {value!r}"
            )
        return value

    @field_validator("receive_budget_bytes")
    @classmethod
    def _room_for_the_largest_body(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("max_request_bytes")
        if largest is not None and value < 2 * largest:
            raise ValueError(
                f"must be at least twice max_request_bytes ({largest}): a body that large may hold at most "
                "half the receive budget"
            )
        return value

    def trt_profile(self) -> tuple[int, int, int] | None:
        """``(min, opt, max)`` batch sizes from ``trt_profile_batches`` (one number N: 1, N, N; two
        numbers: opt = max); ``None`` when unset."""
        sizes = _batch_sizes(self.trt_profile_batches)
        if not sizes:
            return None
        if len(sizes) == 1:
            return 1, sizes[0], sizes[0]
        return sizes[0], sizes[1] if len(sizes) == 3 else sizes[-1], sizes[-1]

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable that sets ``field``: its alias where it has one (``BENTOML_HOME``),
        else the prefix and the field's name (``BACKBONES_WORKERS``)."""
        alias = cls.model_fields[field].validation_alias
        if isinstance(alias, str):
            return alias
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    @classmethod
    def env_for(cls, **values: object) -> dict[str, str]:
        """The environment variables that give a child process these field values."""
        return {cls.env_name(field): str(value) for field, value in values.items()}

    def served_refs(self) -> list[str]:
        return [r.strip() for r in self.serve_models.split(",") if r.strip()]

    def open_paths(self) -> frozenset[str]:
        """The paths answered without a key when authentication is on."""
        return frozenset(p.strip() for p in self.auth_open_paths.split(",") if p.strip())

    def torch_hub_dir(self) -> Path:
        """Where torch.hub keeps downloads, by torch's own rule (TORCH_HOME, XDG_CACHE_HOME, ~/.cache)."""
        root = self.torch_home or (self.xdg_cache_home or Path("~/.cache")) / "torch"
        return root.expanduser() / "hub"


def _batch_sizes(value: str) -> list[int]:
    return [int(v) for v in value.replace(" ", "").split(",") if v]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
