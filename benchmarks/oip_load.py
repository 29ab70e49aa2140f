"""Open Inference Protocol (KServe v2) requests for the load generator (loadgen.py): what
tritonclient sends for a classification, built once per photo group so that the client's cost per
request stays as low as for the multipart requests it is compared with."""

from __future__ import annotations

import json
import statistics
import struct

from loadgen import LoadResult, run_load

TOP_K = 5  # as /classify's default top_k


def infer_request(host: str, model: str, photos: list[bytes], top_k: int = TOP_K, *, column: bool = False) -> bytes:
    """A raw HTTP/1.1 ``POST /v2/models/{model}/infer``: the photos as the BYTES input ``image`` in
    the binary tensor data extension, asking for the top ``top_k`` classes (the classification
    extension) in binary, as ``tritonclient.http`` does with ``InferRequestedOutput("logits",
    class_count=top_k)``. ``column``: shape ``[N, 1]`` (what a Triton model with batching and
    per-sample shape ``[1]`` takes) instead of ``[N]``."""
    raw = b"".join(struct.pack("<I", len(p)) + p for p in photos)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(photos), 1] if column else [len(photos)],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"classification": top_k, "binary_data": True}}],
        }
    ).encode()
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + len(raw)}\r\n\r\n"
    )
    return head.encode() + header + raw


def infer_requests(host: str, model: str, photos: list[bytes], per_request: int) -> list[bytes]:
    """Requests of ``per_request`` photos each, every photo used once (the last group may wrap)."""
    groups = range(0, len(photos), per_request)
    return [infer_request(host, model, [photos[(i + j) % len(photos)] for j in range(per_request)]) for i in groups]


class V2Rounds:
    """The v2 loads of each round (``measure_server``'s ``also``), each compared with the round's
    /classify load at 64 clients just before it."""

    SINGLE_CLIENTS = 64
    BATCH, BATCH_CLIENTS = 8, 8  # 8 photos x 8 clients: as many photos in flight as 64 single ones

    def __init__(self, label: str, model: str, photos: list[bytes], seconds: float) -> None:
        self.label, self.seconds = label, seconds
        self.single = infer_requests("127.0.0.1", model, photos, 1)
        self.batched = infer_requests("127.0.0.1", model, photos, self.BATCH)
        self.rows: list[dict[str, object]] = []
        self.rounds: list[dict[str, float]] = []

    def row(self, name: str, r: LoadResult, per_request: int) -> dict[str, object]:
        return {
            "server": f"{name} {self.label}",
            "clients": r.clients,
            "images_per_s": round(r.rps * per_request, 1),
            "p50_ms": round(r.percentile(50), 1),
            "p99_ms": round(r.percentile(99), 1),
            "non_2xx": r.non_2xx,
            "requests": r.ok + r.non_2xx,
            "round": len(self.rounds) + 1,
        }

    def __call__(self, port: int, loads: list[LoadResult]) -> None:
        classify = next(r for r in loads if r.clients == self.SINGLE_CLIENTS)
        single = run_load("127.0.0.1", port, self.single, self.SINGLE_CLIENTS, self.seconds)
        batched = run_load("127.0.0.1", port, self.batched, self.BATCH_CLIENTS, self.seconds)
        self.rows += [self.row("v2 infer x1", single, 1), self.row(f"v2 infer x{self.BATCH}", batched, self.BATCH)]
        self.rounds.append(
            {
                "classify_64": round(classify.rps, 1),
                "v2_64": round(single.rps, 1),
                f"v2_x{self.BATCH}": round(batched.rps * self.BATCH, 1),
                "non_2xx": single.non_2xx + batched.non_2xx,
            }
        )

    def summary(self) -> dict[str, object]:
        """Median over the rounds of v2 / classify at 64 clients and of batched / single v2."""
        v2_over_classify = statistics.median(r["v2_64"] / max(r["classify_64"], 1e-9) for r in self.rounds)
        batched_over_single = statistics.median(r[f"v2_x{self.BATCH}"] / max(r["v2_64"], 1e-9) for r in self.rounds)
        return {
            "rounds": self.rounds,
            "v2_over_classify_at_64": round(v2_over_classify, 3),
            f"v2_x{self.BATCH}_over_v2_x1": round(batched_over_single, 3),
            "non_2xx": sum(int(r["non_2xx"]) for r in self.rounds),
        }
