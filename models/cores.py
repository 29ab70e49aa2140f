"""How work is spread over the cores: decode workers, ONNX Runtime calls at once (runners) and
their intra-op threads, for the batch job and for the service. The one place these rules live.

The rules are pure functions of the core count and whether ONNX Runtime runs on a GPU; the
callers find those out (:func:`available_cores`, :func:`models.runtime.on_gpu`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# Each GPU worker holds a CUDA context of its own (hundreds of MB of GPU memory and start-up time).
MAX_GPU_WORKERS = 16


CGROUP = Path("/sys/fs/cgroup")


def available_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may run on (its affinity), not the machine's, and no more than its
    CPU quota allows: in a container with a CPU limit the affinity is still the node's cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The cores' worth of CPU time the cgroup grants (``cpu.max`` in cgroup v2, the CFS quota in
    v1), or None where there is no limit or nothing to read."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (cgroup / quota_file).read_text().split()
            period = fields[1] if period_file is None else (cgroup / period_file).read_text()
            if fields[0] in ("max", "-1"):
                return None
            share = float(fields[0]) / float(period)
        except (OSError, IndexError, ValueError, ZeroDivisionError):
            continue
        return share if share > 0 else None
    return None


@dataclass(frozen=True)
class OrtLayout:
    """ONNX Runtime calls that run at once (``runners``) and the intra-op threads of each."""

    runners: int
    threads: int


def ort_layout(cores: int, *, gpu: bool, runners: int = 0, threads: int = 0) -> OrtLayout:
    """ONNX Runtime on ``cores`` cores; ``runners`` and ``threads`` win where given (0: choose).

    On a CPU, one single-threaded call per core at once, each on a micro-batch
    (:class:`models.runtime.ConcurrentRunner`): small calls keep every core busy, where one call's
    threads wait for each other between layers (docs/benchmarks.md). With a GPU, one call: the
    device does the work. Threads default to the cores each runner has."""
    runners = runners or (1 if gpu else cores)
    return OrtLayout(runners=runners, threads=threads or max(1, cores // runners))


def decode_workers(cores: int, *, gpu: bool) -> int:
    """Decode processes beside ONNX Runtime on one machine: half the cores on a CPU, where
    inference needs most of the machine (docs/benchmarks.md); every core with a GPU, where
    decoding is the bottleneck."""
    return cores if gpu else max(1, cores // 2)


@dataclass(frozen=True)
class BatchPlan:
    """How the batch job uses ``cores``: decode ``workers`` beside ONNX Runtime's ``runners``
    calls at once, each on ``threads`` intra-op threads."""

    workers: int
    runners: int
    threads: int


def batch_plan(
    cores: int, *, gpu: bool, workers: int | None = None, threads: int | None = None, lone_call_threads: int = 0
) -> BatchPlan:
    """The batch job's plan. ``workers`` given: that many decode workers. ``threads`` given: one
    call on that many threads, else :func:`ort_layout`; a lone call (GPU, one core) takes
    ``lone_call_threads`` when set (the ``intra_op_threads`` setting, as any session does)."""
    if threads:
        layout = OrtLayout(runners=1, threads=threads)
    else:
        layout = ort_layout(cores, gpu=gpu)
        if layout.runners == 1 and lone_call_threads:
            layout = OrtLayout(runners=1, threads=lone_call_threads)
    chosen = decode_workers(cores, gpu=gpu) if workers is None else workers
    return BatchPlan(workers=chosen, runners=layout.runners, threads=layout.threads)


@dataclass(frozen=True)
class ServingPlan:
    """How a service spreads over the machine: worker processes, and in each worker the ONNX
    Runtime calls that run at once (runners), their intra-op threads, and the decode threads; a
    call that runs alone (one request, every runner idle) takes ``lone_call_threads`` where that is
    not 0 (a session of its own)."""

    workers: int
    runners: int
    intra_op_threads: int
    decode_threads: int
    lone_call_threads: int = 0


def plan_serving(
    cores: int, *, gpu: bool, workers: int = 0, runners: int = 0, threads: int = 0, decode_threads: int = 0
) -> ServingPlan:
    """The serving layout on ``cores`` cores; each number given (not 0) wins.

    On a CPU, one worker process per core (in one process, HTTP parsing, decoding and the batcher
    share one interpreter lock, so processes beat threads), each laid out for the whole machine by
    :func:`ort_layout` with a decode thread per core, and none pinned: a keep-alive connection stays
    on the worker that accepted it, so however the connections land, a worker that has work can use
    every core, and the scheduler shares them when every worker has some (docs/benchmarks.md). With
    a GPU the cores are left with HTTP and decoding: one worker per core there too, at most
    :data:`MAX_GPU_WORKERS`, each with its share of the cores.

    A lone request on a CPU runs on every core (a second session, ``lone_call_threads``): one
    single-threaded call would take nearly twice as long on two cores (docs/benchmarks.md)."""
    workers = workers or (min(MAX_GPU_WORKERS, cores) if gpu else cores)
    per_worker = max(1, cores // workers) if gpu else cores
    layout = ort_layout(per_worker, gpu=gpu, runners=runners, threads=threads)
    lone = per_worker if not gpu and not threads and layout.threads < per_worker else 0
    return ServingPlan(
        workers=workers,
        runners=layout.runners,
        intra_op_threads=layout.threads,
        decode_threads=decode_threads or per_worker,
        lone_call_threads=lone,
    )
