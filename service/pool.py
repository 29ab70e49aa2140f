"""The models a service answers with, and hot swaps when an alias they follow moves.

Each served reference (``name``, ``name@alias`` or ``name:version``) is a :class:`ModelSlot` whose
current :class:`ServedModel` can be replaced while the service runs: the new version is loaded,
checked and warmed up beside the old one, then swapped in with one assignment. Requests hold the
``ServedModel`` they started with, so in-flight requests finish on the old version, whose batcher
drains and stops. A version that fails to load leaves the old one serving; the failure is logged,
shown in ``/models`` and counted in ``backbones_model_swaps_total{outcome="failed"}``. A model
that has not loaded at all (a missing registry, a broken file) is retried with exponential backoff
up to ``load_retry_max_seconds``; ``/readyz`` says why meanwhile (service/drain.py). Versions come
from the local store or from a registry in object storage, pulled into it (service/source.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from models import BackbonesError, InferenceModel, Registry, Settings
from models.registry import Ref, StoredVersion
from models.runtime import serving_plan

from .batching import BatchStats, MicroBatcher, calibrate_batch_size
from .metrics import metrics
from .public import public_spec, redact
from .source import RETRY_FIRST_SECONDS, ModelSource, SourceUnavailableError, source_for

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One loaded version with its batcher."""

    model: InferenceModel
    batcher: MicroBatcher
    batch_rates: dict[int, float] = field(default_factory=dict)  # measured images/s by batch size
    loaded_at: float = field(default_factory=time.time)

    @property
    def tag(self) -> str:
        return self.model.tag


@dataclass
class ModelSlot:
    """One served reference and the version that answers for it now (None until one has loaded)."""

    ref: str
    name: str
    follows: bool  # False for name:version, which never moves
    current: ServedModel | None = None
    error: str | None = None  # the last failed load, if it has not been fixed by a later one
    failed_version: str | None = None  # a version that failed to load is not retried on every poll
    loading: bool = False
    retry_in: float = 0.0  # while nothing is loaded: the wait before the next attempt (doubles)
    retry_at: float = 0.0  # time.monotonic() of the next attempt

    def describe(self, registry: ModelSource) -> dict[str, Any]:
        """This slot as ``GET /models`` shows it: what a client needs, no paths (service/public.py)."""
        doc: dict[str, Any] = {
            "ref": self.ref,
            "name": self.name,
            "follows": self.follows,
            "ready": self.current is not None,
        }
        if self.current is not None:
            spec = self.current.model.spec
            doc.update(
                tag=spec.tag,
                version=spec.version,
                loaded_at=self.current.loaded_at,
                providers=self.current.model.session.providers,
                runners=self.current.batcher.runners,
                max_batch_size=self.current.batcher.max_batch_size,
                measured_images_per_s={str(k): round(v, 1) for k, v in self.current.batch_rates.items()},
                spec=public_spec(spec),
            )
        try:
            doc["aliases"] = registry.aliases(self.name)
        except BackbonesError as e:
            doc["aliases"] = {}
            doc["aliases_error"] = redact(str(e))
        doc["last_error"] = redact(self.error) if self.error else None
        return doc


class ModelPool:
    def __init__(self, refs: list[str], *, settings: Settings, registry: Registry | None = None) -> None:
        if not refs:
            raise BackbonesError(f"no model to serve: pass --model REF (or set {Settings.env_name('serve_models')})")
        self.settings = settings
        self.registry = registry or Registry(settings=settings)
        self.source = source_for(settings, self.registry)  # the local store, or a bucket it caches
        self.slots: list[ModelSlot] = []
        for ref in refs:
            parsed = Ref.parse(ref)
            if any(s.name == parsed.name for s in self.slots):
                raise BackbonesError(f"model {parsed.name!r} is listed twice; serve each name once")
            self.slots.append(ModelSlot(ref=ref, name=parsed.name, follows=parsed.version is None))
        self._poller: asyncio.Task[None] | None = None

    # -- lookup ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return all(s.current is not None for s in self.slots)

    def describe(self) -> dict[str, Any]:
        """``GET /models``: readiness, and each served model as :meth:`ModelSlot.describe` has it."""
        return {"ready": self.ready, "models": [s.describe(self.source) for s in self.slots]}

    def not_ready_reasons(self) -> dict[str, str]:
        """Why each model that is not loaded yet is not: its last load error, or ``loading``."""
        return {s.ref: redact(s.error) if s.error else "loading" for s in self.slots if s.current is None}

    def update_errors(self) -> dict[str, str]:
        """Why each loaded model may not serve the version it should: the registry could not be
        read, or the version its alias points to failed to load."""
        return {s.ref: redact(s.error) for s in self.slots if s.current is not None and s.error}

    def find(self, requested: str | None) -> ModelSlot | None:
        """The slot a request's ``model`` field names (None: the first served model).

        ``name``, ``name@alias`` and ``name:version`` match the slot of that name; a version or
        alias must be the one the slot serves now."""
        if requested is None:
            return self.slots[0]
        ref = Ref.parse(requested)
        slot = next((s for s in self.slots if s.name == ref.name), None)
        if slot is None or slot.current is None:
            return slot
        if ref.version and not slot.current.model.spec.version.startswith(ref.version):
            return None
        if ref.alias and self.source.aliases(ref.name).get(ref.alias) != slot.current.model.spec.version:
            return None
        return slot

    # -- loading and swapping -------------------------------------------------------------

    def _make_served(self, stored: StoredVersion | None, ref: str) -> ServedModel:
        plan = serving_plan(self.settings)
        runners, threads = plan.runners, plan.intra_op_threads
        # preflight: a file that would crash ONNX Runtime crashes a child process, not this server
        model = (
            InferenceModel(
                stored, settings=self.settings, threads=threads, preflight=True, lone_threads=plan.lone_call_threads
            )
            if stored is not None
            else self.source.open(ref, settings=self.settings, threads=threads, lone_threads=plan.lone_call_threads)
        )
        batch_size, rates = self.settings.max_batch_size, dict[int, float]()
        if not batch_size:
            batch_size, rates = calibrate_batch_size(model.run, model.session.input_shape[1:])
        if model.session.pad_batches:  # every padded shape is warm before the first request
            model.session.warmup_batches(batch_size)
        log.warning(
            "%s: %d runner(s) x %d thread(s)%s, batches of up to %d%s",
            model.tag,
            runners,
            threads,
            f" (alone: {plan.lone_call_threads} threads)" if plan.lone_call_threads else "",
            batch_size,
            f" (measured images/s by batch size: {', '.join(f'{k}: {v:.0f}' for k, v in rates.items())})"
            if rates
            else "",
        )
        m = metrics()
        name, version = model.spec.name, model.spec.version

        def on_batch(stats: BatchStats) -> None:
            m.batch_size.labels(name, version).observe(stats.size)
            m.inference_seconds.labels(name, version).observe(stats.inference_seconds)
            for wait in stats.queue_wait:
                m.queue_wait_seconds.labels(name, version).observe(wait)

        batcher = MicroBatcher(
            model.run,
            run_alone=model.run_alone,
            max_batch_size=batch_size,
            queue_limit=self.settings.queue_limit,
            runners=runners,
            on_batch=on_batch,
            name=name,
        )
        return ServedModel(model=model, batcher=batcher, batch_rates=rates)

    async def _load(self, slot: ModelSlot, stored: StoredVersion | None) -> None:
        slot.loading = True
        m = metrics()
        try:
            served = await asyncio.to_thread(self._make_served, stored, slot.ref)
        except Exception as e:  # any failure keeps the old version serving
            slot.error = f"{type(e).__name__}: {e}" if not isinstance(e, BackbonesError) else str(e)
            m.swaps.labels(slot.name, "failed").inc()
            log.error(
                "could not load %s: %s (still serving %s)",
                slot.ref,
                slot.error,
                slot.current.tag if slot.current else "nothing",
            )
            return
        finally:
            slot.loading = False
        old, slot.current, slot.error, slot.failed_version = slot.current, served, None, None
        m.model_loaded.labels(slot.name, served.model.spec.version).set(1)
        if old is not None:
            m.swaps.labels(slot.name, "ok").inc()
            m.model_loaded.labels(slot.name, old.model.spec.version).set(0)
            log.warning("%s now serves %s (was %s)", slot.ref, served.tag, old.tag)
            asyncio.get_running_loop().create_task(old.batcher.close())
        else:
            log.warning("%s serves %s", slot.ref, served.tag)

    async def _refresh(self, slot: ModelSlot) -> None:
        """Load the slot's model if it has none, or the version its alias now points to."""
        if slot.loading:
            return
        if slot.current is None:
            if time.monotonic() < slot.retry_at:
                return
            await self._load(slot, None)
            if slot.current is None:
                self._back_off(slot)
            return
        if not slot.follows:
            return
        try:
            name, version = await asyncio.to_thread(self.source.resolve, slot.ref)
        except BackbonesError as e:
            slot.error = str(e)
            return
        if version == slot.current.model.spec.version:
            slot.error = None  # the registry answers again, and nothing newer is waiting
            return
        if version == slot.failed_version:
            return
        try:
            stored = await asyncio.to_thread(self.source.get, f"{name}:{version}")
        except BackbonesError as e:
            slot.error = str(e)
            if not isinstance(e, SourceUnavailableError):  # a store that did not answer is asked again
                slot.failed_version = version
            metrics().swaps.labels(slot.name, "failed").inc()
            log.error("not switching %s to %s:%s: %s", slot.ref, name, version, e)
            return
        await self._load(slot, stored)
        if slot.current is None or slot.current.model.spec.version != version:
            slot.failed_version = version

    def _back_off(self, slot: ModelSlot) -> None:
        """Schedule the next attempt at a model that has never loaded: 1 s, 2 s, 4 s .. up to
        ``load_retry_max_seconds``, so a missing registry or a broken file is not hammered (each
        attempt hashes the model's files) yet a fix is picked up soon after it lands."""
        cap = self.settings.load_retry_max_seconds
        slot.retry_in = min(cap, max(RETRY_FIRST_SECONDS, 2 * slot.retry_in))
        slot.retry_at = time.monotonic() + slot.retry_in
        log.warning("%s is not loaded; next attempt in %.1f s", slot.ref, slot.retry_in)

    async def start(self) -> None:
        """Try to load every model once, then follow their aliases (and retry failed loads) in the
        background."""
        for slot in self.slots:
            try:
                await self._refresh(slot)
            except Exception:  # a failure is recorded in the slot; the poller retries
                log.exception("loading %s failed", slot.ref)
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            for slot in self.slots:
                try:
                    await self._refresh(slot)
                except Exception:  # the poller must survive anything
                    log.exception("refreshing %s failed", slot.ref)
            await asyncio.sleep(self.settings.swap_poll_seconds)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await asyncio.gather(*(s.current.batcher.close() for s in self.slots if s.current is not None))
