"""Inference and preprocessing, measured side by side in one run.

a. ONNX Runtime (``models.runtime.OnnxSession``) vs PyTorch eager for efficientnet_lite0: images/s at
   batch 1 and 16 on all cores, measured in interleaved rounds (median reported) with the ratio ORT/PyTorch.
b. Decode + preprocess time per photo with and without JPEG draft decoding (one core), over the
   ImageNet sample photos, the subset large enough for draft to apply (shorter side >= 1024 px for a
   resize of 256), and copies of the photos upscaled to a shorter side of 1024 and 2048 px (stand-ins
   for the large camera photos the sample lacks).
c. What draft decoding does to the model's output on the same sets: max |Δlogit| between draft and
   full decoding, top-1 agreement, and (for scale) ONNX Runtime vs PyTorch on the same inputs.

    uv run python benchmarks/bench_inference.py [--data DIR] [--rounds N] [--json]

Without the data folder, parts b and c are skipped (one line says so, exit status 2) and part a runs
on synthetic photos.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models import ImageLoader, OnnxSession, Registry, Settings, decode_image, get_entry
from models.catalog import CatalogEntry
from models.export import LOGIT_TOLERANCE, export_catalog
from models.imaging import DRAFT_MARGIN
from models.networks import Backbone
from models.runtime import available_cores, gpu_driver_present
from models.samples import synthetic_jpegs
from models.weights import build_pretrained

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_DATA_NAME = "../shared/data"
SAMPLE_DIR = "imagenet-sample"
MODEL = "efficientnet_lite0"
BATCH_SIZES = (1, 16)
IMAGES_PER_MEASUREMENT = 64
UPSCALED_SIDES = (1024, 2048)  # draft's threshold for a resize of 256, and twice that
RUN_BATCH = 16
# Timings are flagged as disturbed when other processes used more than this share of the machine's
# CPU time, on top of the share of cores the part leaves free (half of them, at most).
DISTURBED = 0.05


@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes
    short_side: int


# -- inputs ---------------------------------------------------------------------------------------


def find_sample(data: Path) -> Path | None:
    """The ImageNet sample folder: ``DATA/imagenet-sample``, or ``DATA`` itself if it holds the photos."""
    for folder in (data / SAMPLE_DIR, data):
        if folder.is_dir() and any(p.suffix.lower() in (".jpeg", ".jpg") for p in folder.iterdir()):
            return folder
    return None


def load_photos(folder: Path) -> list[Photo]:
    photos = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".jpeg", ".jpg", ".png"):
            continue
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            photos.append(Photo(path.name, data, min(img.size)))
    return photos


def upscaled(photos: Sequence[Photo], short_side: int) -> list[Photo]:
    """The photos resized (Lanczos) so that their shorter side is ``short_side``, re-encoded as JPEG
    quality 95: a stand-in for large camera photos, with less fine detail than real ones."""
    out = []
    for p in photos:
        img = decode_image(p.data)
        w, h = img.size
        scale = short_side / min(w, h)
        big = img.resize(
            (max(short_side, round(w * scale)), max(short_side, round(h * scale))), Image.Resampling.LANCZOS
        )
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=95)
        out.append(Photo(p.name, buf.getvalue(), min(big.size)))
    return out


def class_index(data_root: Path) -> dict[str, int]:
    """wnid -> class index, from ``imagenet_wnids.txt`` when the data folder has it."""
    path = data_root / "imagenet_wnids.txt"
    if not path.is_file():
        return {}
    return {line.strip(): i for i, line in enumerate(path.read_text().split()) if line.strip()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class OtherLoad:
    """The share of the machine's CPU time that other processes used since this was made (Linux;
    ``None`` elsewhere): a shared machine disturbs timings, and this says when it did."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int, int] | None:
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            return None
        total = sum(cpu)
        return total, total - cpu[3] - cpu[4], int(own[11]) + int(own[12])  # all, busy, this process

    def fraction(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[0] == self._start[0]:
            return None
        total, busy, mine = (e - s for e, s in zip(end, self._start, strict=True))
        return max(0.0, (busy - mine) / total)


# -- a. ONNX Runtime vs PyTorch -------------------------------------------------------------------


def _time_images_per_s(fn: Callable[[], object], iterations: int, batch: int) -> float:
    fn()  # untimed: the other framework's threads may still be spinning
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return iterations * batch / (time.perf_counter() - start)


def _torch_forward(net: Backbone, x: torch.Tensor) -> object:
    with torch.inference_mode():
        return net(x)


def bench_engines(session: OnnxSession, net: Backbone, inputs: np.ndarray, rounds: int) -> list[dict[str, Any]]:
    """images/s of both engines at each batch size; each round measures both, alternating which
    goes first, and the median over rounds is reported."""
    rows = []
    for batch in BATCH_SIZES:
        x = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])), dtype=np.float32)
        xt = torch.from_numpy(x)

        engines: dict[str, Callable[[], object]] = {
            "ort": partial(session.run, x),
            "torch": partial(_torch_forward, net, xt),
        }
        for fn in engines.values():  # warm-up
            for _ in range(3):
                fn()
        iterations = max(2, IMAGES_PER_MEASUREMENT // batch)
        samples: dict[str, list[float]] = {"ort": [], "torch": []}
        for r in range(rounds):
            order = ("ort", "torch") if r % 2 == 0 else ("torch", "ort")
            for name in order:
                time.sleep(0.05)
                samples[name].append(_time_images_per_s(engines[name], iterations, batch))
        ort_ips, torch_ips = statistics.median(samples["ort"]), statistics.median(samples["torch"])
        rows.append(
            {
                "batch": batch,
                "ort_images_per_s": ort_ips,
                "torch_images_per_s": torch_ips,
                "ratio_ort_over_torch": ort_ips / torch_ips,
                # each round measures both engines back to back: its ratio is a paired comparison
                "round_ratios": [o / t for o, t in zip(samples["ort"], samples["torch"], strict=True)],
                "ort_samples": samples["ort"],
                "torch_samples": samples["torch"],
            }
        )
    return rows


# -- b. decode + preprocess time ------------------------------------------------------------------


@contextmanager
def one_core() -> Iterator[None]:
    """Pin the calling thread to one core (Pillow and NumPy do this work on the calling thread)."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def time_loaders(photos: Sequence[Photo], loaders: dict[str, ImageLoader], rounds: int) -> dict[str, list[float]]:
    """Per photo, the median over rounds of its decode + preprocess time (ms) with each loader.
    The loaders alternate photo by photo, and the first pass is an untimed warm-up."""
    times: dict[str, list[list[float]]] = {k: [[] for _ in photos] for k in loaders}
    names = list(loaders)
    with one_core():
        for r in range(rounds + 1):
            for i, p in enumerate(photos):
                for name in names if (r + i) % 2 == 0 else reversed(names):
                    start = time.perf_counter()
                    loaders[name](p.data)
                    if r:
                        times[name][i].append((time.perf_counter() - start) * 1e3)
    return {k: [statistics.median(t) for t in v] for k, v in times.items()}


def draft_applies(photos: Sequence[Photo], loaders: dict[str, ImageLoader]) -> list[bool]:
    """Whether draft decoding changed what the decoder produced, photo by photo."""
    return [loaders["draft"].decode(p.data).size != loaders["full"].decode(p.data).size for p in photos]


def preprocess_row(
    label: str, per_photo: dict[str, list[float]], index: Sequence[int], applied: Sequence[bool]
) -> dict[str, Any]:
    row: dict[str, Any] = {"set": label, "photos": len(index), "draft_applied": sum(applied[i] for i in index)}
    if not index:
        return row
    for mode in ("draft", "full"):
        ms = [per_photo[mode][i] for i in index]
        row[f"{mode}_median_ms"] = statistics.median(ms)
        row[f"{mode}_mean_ms"] = statistics.fmean(ms)
    row["saving_mean"] = 1 - row["draft_mean_ms"] / row["full_mean_ms"]
    row["speedup_mean"] = row["full_mean_ms"] / row["draft_mean_ms"]
    return row


# -- c. draft decoding and the model's output -----------------------------------------------------


def logits_of(session: OnnxSession, arrays: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(arrays[i : i + RUN_BATCH]).logits for i in range(0, len(arrays), RUN_BATCH)])


def draft_effect(
    label: str,
    photos: Sequence[Photo],
    loaders: dict[str, ImageLoader],
    session: OnnxSession,
    labels: Sequence[str],
    wnids: dict[str, int],
    original: np.ndarray | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Draft vs full decoding through the ONNX session: how far the logits move, whether top-1 moves.

    ``original``: the full-decode logits of the photos these are upscaled copies of; the row then
    also says how far upscaling itself moved them. Returns the row and the full-decode logits.
    """
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in loaders}
    applied = 0
    for p in photos:
        images = {k: ld.decode(p.data) for k, ld in loaders.items()}
        applied += images["draft"].size != images["full"].size
        for k, img in images.items():
            arrays[k].append(loaders[k].transform(img))
    logits = {k: logits_of(session, np.stack(a)) for k, a in arrays.items()}
    diff = np.abs(logits["draft"] - logits["full"]).max(axis=1)
    top1 = {k: v.argmax(1) for k, v in logits.items()}
    top5 = {k: np.argsort(-v, axis=1)[:, :5] for k, v in logits.items()}
    flips = []
    for i in np.flatnonzero(top1["draft"] != top1["full"]).tolist():
        full, draft = logits["full"][i], logits["draft"][i]
        a, b = int(top1["full"][i]), int(top1["draft"][i])
        flips.append(
            {
                "photo": photos[i].name,
                "full_top1": f"{a} {labels[a]}",
                "draft_top1": f"{b} {labels[b]}",
                "full_lead": float(full[a] - full[b]),  # the full decode's winner over the draft's, in logits
                "draft_lead": float(draft[b] - draft[a]),
                "max_abs_logit_diff": float(diff[i]),
            }
        )
    row: dict[str, Any] = {
        "set": label,
        "photos": len(photos),
        "draft_applied": int(applied),
        "max_abs_logit_diff": float(diff.max()),
        "median_abs_logit_diff": float(np.median(diff)),  # median over photos of each photo's max
        "photos_over_tolerance": int((diff > LOGIT_TOLERANCE).sum()),
        "top1_agree": int((top1["draft"] == top1["full"]).sum()),
        "top5_same_set": int(sum(set(a) == set(b) for a, b in zip(top5["draft"], top5["full"], strict=True))),
        "flips": flips,
    }
    truth = [wnids.get(p.name.split("_", 1)[0]) for p in photos]
    if wnids and all(t is not None for t in truth):
        row["top1_correct"] = {k: int((v == np.asarray(truth)).sum()) for k, v in top1.items()}
    if original is not None:
        moved = np.abs(logits["full"] - original).max(axis=1)
        row["upscaling_itself"] = {
            "max_abs_logit_diff": float(moved.max()),
            "median_abs_logit_diff": float(np.median(moved)),
            "top1_agree": int((top1["full"] == original.argmax(1)).sum()),
        }
    return row, logits["full"]


def parity_context(session: OnnxSession, net: Backbone, arrays: np.ndarray) -> float:
    """ONNX Runtime vs PyTorch max |Δlogit| on the same inputs: the export parity noise, for scale."""
    with torch.inference_mode():
        ref = np.concatenate(
            [net(torch.from_numpy(arrays[i : i + RUN_BATCH]))[0].numpy() for i in range(0, len(arrays), RUN_BATCH)]
        )
    return float(np.abs(logits_of(session, arrays) - ref).max())


# -- output ---------------------------------------------------------------------------------------


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "n/a"


def _load_note(results: dict[str, Any], part: str, cores_used: int) -> list[str]:
    share = results.get("other_load", {}).get(part)
    if share is None:
        return []
    cores = results["machine"]["cores"]
    note = f"other processes used {100 * share:.0f} % of the machine's CPU time during this part"
    if share > DISTURBED + 0.5 * (1 - cores_used / cores):
        note += ": the figures are disturbed, rerun on a quiet machine"
    return ["", note]


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        (
            f"machine: {m['cpu']}, {m['cores']} cores, {'GPU present, not used' if m['gpu'] else 'no GPU'}; "
            f"Python {m['python']}, torch {m['torch']}, "
            f"onnxruntime {m['onnxruntime']}, Pillow {m['pillow']}"
        ),
        (
            f"model: {results['model']}; data: {results['data']}; rounds: {results['rounds']}; "
            f"DRAFT_MARGIN: {results['draft_margin']}"
        ),
        "",
        (
            f"a. inference, {results['threads']} threads, images/s (median of {results['rounds']} interleaved "
            f"rounds, inputs: {results['inference_inputs']})"
        ),
        "",
        "| batch | ONNX Runtime | PyTorch eager | ORT / PyTorch | ORT / PyTorch, range over rounds |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["inference"]:
        lines.append(
            f"| {r['batch']} | {r['ort_images_per_s']:.1f} | {r['torch_images_per_s']:.1f} | "
            f"{r['ratio_ort_over_torch']:.2f} | {min(r['round_ratios']):.2f} to {max(r['round_ratios']):.2f} |"
        )
    lines += _load_note(results, "inference", results["threads"])
    pre = results.get("preprocess")
    if pre is None:
        lines += ["", f"b, c. skipped: {results['skipped']}"]
        return "\n".join(lines)
    lines += [
        "",
        (
            f"b. decode + preprocess (resize {pre['resize']}, crop {pre['crop']}, {pre['interpolation']}), "
            f"one core, ms per photo (per photo: median of {results['rounds']} rounds)"
        ),
        "",
        "| photos | n | draft applied | draft median | full median | draft mean | full mean | time saved (mean) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in pre["rows"]:
        saved = f"{100 * r['saving_mean']:.0f} % ({r['speedup_mean']:.2f}x)" if "saving_mean" in r else "n/a"
        lines.append(
            f"| {r['set']} | {r['photos']} | {r['draft_applied']} | {_ms(r, 'draft_median_ms')} | "
            f"{_ms(r, 'full_median_ms')} | "
            f"{_ms(r, 'draft_mean_ms')} | {_ms(r, 'full_mean_ms')} | {saved} |"
        )
    lines += _load_note(results, "preprocess", 1)
    acc = results["draft_accuracy"]
    lines += [
        "",
        (
            f"c. draft vs full decoding, {results['model']} ONNX logits; |Δlogit| is each photo's max over the "
            f"1000 logits (tolerance {LOGIT_TOLERANCE:g}; ONNX Runtime vs PyTorch on the same photos: "
            f"{acc['ort_vs_torch_max_abs_logit_diff']:.1e})"
        ),
        "",
        (
            "| photos | n | draft applied | max abs Δlogit | median abs Δlogit | over tolerance | top-1 same "
            "| top-5 same set | top-1 correct, draft / full |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in acc["rows"]:
        correct = f"{r['top1_correct']['draft']} / {r['top1_correct']['full']}" if "top1_correct" in r else "n/a"
        lines.append(
            f"| {r['set']} | {r['photos']} | {r['draft_applied']} | {r['max_abs_logit_diff']:.3g} | "
            f"{r['median_abs_logit_diff']:.3g} | {r['photos_over_tolerance']} | {r['top1_agree']} / {r['photos']} | "
            f"{r['top5_same_set']} / {r['photos']} | {correct} |"
        )
    scale = [r for r in acc["rows"] if "upscaling_itself" in r]
    if scale:
        lines += ["", "for scale, what upscaling alone did (full decoding, upscaled copy vs original photo):", ""]
        for r in scale:
            u = r["upscaling_itself"]
            lines.append(
                f"- {r['set']}: max |Δlogit| {u['max_abs_logit_diff']:.3g}, median {u['median_abs_logit_diff']:.3g}, "
                f"top-1 same {u['top1_agree']} / {r['photos']}"
            )
    flips = [(r["set"], f) for r in acc["rows"] for f in r["flips"]]
    if flips:
        lines += ["", "top-1 changed by draft decoding (lead: the winner's logit minus the other one's):", ""]
        for label, f in flips:
            lines.append(
                f"- {label}: {f['photo']}: full {f['full_top1']} (lead {f['full_lead']:.3f}) -> "
                f"draft {f['draft_top1']} (lead {f['draft_lead']:.3f}); max |Δlogit| {f['max_abs_logit_diff']:.3f}"
            )
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="ONNX Runtime vs PyTorch throughput, and JPEG draft decoding's cost and effect, in one run."
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"the data folder holding {SAMPLE_DIR}/ (or the photo folder itself); default: {DEFAULT_DATA_NAME}",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (median reported)")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_root: Path = args.data if args.data is not None else DEFAULT_DATA
    shown = str(args.data) if args.data is not None else DEFAULT_DATA_NAME
    sample = find_sample(data_root)
    shown_sample = f"{shown}/{SAMPLE_DIR}" if sample == data_root / SAMPLE_DIR else shown
    cores = available_cores()
    torch.set_num_threads(cores)

    import onnxruntime
    import PIL

    results: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(),
            "cores": cores,
            "gpu": gpu_driver_present(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "pillow": PIL.__version__,
        },
        "model": MODEL,
        "rounds": args.rounds,
        "threads": cores,
        "data": shown_sample if sample else None,
        "draft_margin": DRAFT_MARGIN,
    }
    if sample is None:
        results["skipped"] = f"no photos in {shown} (expected {shown}/{SAMPLE_DIR}/*.JPEG)"
        print(
            f"bench_inference: {results['skipped']}: parts b and c skipped, part a runs on synthetic photos",
            file=sys.stderr,
        )

    entry: CatalogEntry = get_entry(MODEL)
    pre = entry.preprocess
    photos = load_photos(sample) if sample else []
    loaders = {"draft": ImageLoader(pre, draft=True), "full": ImageLoader(pre, draft=False)}

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        version = export_catalog(MODEL, registry=Registry(Path(tmp) / "registry"))
        session = OnnxSession(version.file("model.onnx"), settings=Settings(providers="cpu"), threads=cores)
        net = build_pretrained(entry)

        # a. the inputs' content does not matter for speed; real photos where there are some
        sources: list[bytes] = [p.data for p in photos[:RUN_BATCH]] or synthetic_jpegs(RUN_BATCH)
        results["inference_inputs"] = "sample photos" if photos else "synthetic photos"
        meter = OtherLoad()
        results["inference"] = bench_engines(session, net, np.stack([loaders["full"](s) for s in sources]), args.rounds)
        results["other_load"] = {"inference": meter.fraction()}

        if sample is not None and photos:
            sets: list[tuple[str, list[Photo]]] = [(SAMPLE_DIR, photos)]
            sets += [(f"{SAMPLE_DIR} upscaled to {side} px", upscaled(photos, side)) for side in UPSCALED_SIDES]

            # b. decode + preprocess time
            meter = OtherLoad()
            rows = []
            for label, subset in sets:
                per_photo = time_loaders(subset, loaders, args.rounds)
                applied = draft_applies(subset, loaders)
                rows.append(preprocess_row(label, per_photo, range(len(subset)), applied))
                if label == SAMPLE_DIR:
                    threshold = 2 * DRAFT_MARGIN * pre.resize  # models.imaging drafts from this size on
                    large = [i for i, p in enumerate(subset) if p.short_side >= threshold]
                    large_label = f"{SAMPLE_DIR}, shorter side >= {threshold} px"
                    rows.append(preprocess_row(large_label, per_photo, large, applied))
                elif 0 < sum(applied) < len(subset):
                    drafted = [i for i, a in enumerate(applied) if a]
                    rows.append(preprocess_row(f"{label}, where draft applied", per_photo, drafted, applied))
            results["preprocess"] = {**pre.to_dict(), "rows": rows}
            results["other_load"]["preprocess"] = meter.fraction()

            # c. draft decoding and the logits
            labels = entry.labels()
            wnids = class_index(sample.parent)
            rows_c = []
            original: np.ndarray | None = None
            for label, subset in sets:
                row, full_logits = draft_effect(label, subset, loaders, session, labels, wnids, original)
                rows_c.append(row)
                original = full_logits if original is None else original
            results["draft_accuracy"] = {
                "ort_vs_torch_max_abs_logit_diff": parity_context(
                    session, net, np.stack([loaders["full"](p.data) for p in photos])
                ),
                "rows": rows_c,
            }

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render(results))
    return 0 if photos else 2


if __name__ == "__main__":
    sys.exit(main())
