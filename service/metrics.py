"""The project's Prometheus metrics, exported on BentoML's ``/metrics`` next to BentoML's own.

Created through ``bentoml.metrics`` (prometheus-client underneath) so that they live in the
multi-process registry BentoML's workers share. Labels: ``model`` is the served name, ``version``
the exact version that answered.
"""

from __future__ import annotations

from functools import cache
from typing import Any

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


class Metrics:
    def __init__(self) -> None:
        import bentoml

        m: Any = bentoml.metrics
        self.requests = m.Counter(
            name="backbones_requests_total",
            documentation="HTTP requests by endpoint, model, version, outcome (ok, client_error, overloaded, "
            "cancelled, error) and protocol (backbones: /classify and /embed; oip: the Open Inference Protocol's "
            "/v2 routes)",
            labelnames=["endpoint", "model", "version", "outcome", "protocol"],
        )
        self.decode_seconds = m.Histogram(
            name="backbones_decode_seconds",
            documentation="Decode + preprocess time per image",
            labelnames=["model"],
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_wait_seconds = m.Histogram(
            name="backbones_queue_wait_seconds",
            documentation="Time an image waited for its batch to start",
            labelnames=["model", "version"],
            buckets=_LATENCY_BUCKETS,
        )
        self.inference_seconds = m.Histogram(
            name="backbones_inference_seconds",
            documentation="ONNX Runtime time per batch",
            labelnames=["model", "version"],
            buckets=_LATENCY_BUCKETS,
        )
        self.batch_size = m.Histogram(
            name="backbones_batch_size",
            documentation="Images per ONNX Runtime call",
            labelnames=["model", "version"],
            buckets=_BATCH_BUCKETS,
        )
        self.top1_confidence = m.Histogram(
            name="backbones_top1_confidence",
            documentation="Softmax probability of the top class of each classification",
            labelnames=["model", "version"],
            buckets=_CONFIDENCE_BUCKETS,
        )
        self.model_loaded = m.Gauge(
            name="backbones_model_loaded",
            documentation="1 for the version of each served model that answers requests",
            labelnames=["model", "version"],
            multiprocess_mode="max",
        )
        self.swaps = m.Counter(
            name="backbones_model_swaps_total",
            documentation="Version changes of served models by outcome (ok, failed)",
            labelnames=["model", "outcome"],
        )
        self.inflight = m.Gauge(
            name="backbones_inflight_requests",
            documentation="Requests admitted and not yet answered",
            labelnames=["model"],
            multiprocess_mode="livesum",
        )


@cache
def metrics() -> Metrics:
    """The metrics, created once per process (after BentoML has set up its registry)."""
    return Metrics()
