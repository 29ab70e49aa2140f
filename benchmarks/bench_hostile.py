"""Hostile traffic, measured side by side in one run. One section per command; more sections are
added to ``SECTIONS``.

decode: for each decoded mode, the largest image the limits allow (small on disk), next to an RGB
JPEG of the same pixel count with photo-like content: decode + preprocess time and peak RSS growth,
each in a fresh subprocess (median over rounds), and their ratios to the JPEG. Target (issue
"Hostile traffic"): no mode over 4x the JPEG's time or 0.5 GiB.

    uv run python benchmarks/bench_hostile.py decode [--max-pixels N] [--rounds N] [--json]

Linux only (peak RSS is read from /proc).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.imaging import RGB_BYTES_PER_PIXEL, bytes_per_pixel
from models.preprocess import ImageLoader
from models.samples import synthetic_image
from models.settings import Settings
from models.spec import Preprocess

MIB = 1 << 20
TIME_TARGET = 4.0  # times the JPEG's decode + preprocess time
MEMORY_TARGET = 512 * MIB  # peak RSS growth of the process that decodes


@dataclass(frozen=True)
class Section:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict[str, Any]]
    report: Callable[[dict[str, Any]], None]


# -- decode -----------------------------------------------------------------------------------------


def _pattern(size: tuple[int, int], channels: int = 1, hi: int = 256) -> np.ndarray:
    """A (height, width[, channels]) ramp modulo ``hi``, repeated: compresses to little, like an attack."""
    w, h = size
    yy, xx = np.mgrid[0:256, 0:256]
    tile = np.stack([(xx * (7 + c) + yy * (3 + 2 * c)) * max(1, hi // 4096) % hi for c in range(channels)], axis=-1)
    full = np.tile(tile, (-(-h // 256), -(-w // 256), 1))[:h, :w]
    return full[..., 0] if channels == 1 else full


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _palette_png(size: tuple[int, int]) -> bytes:
    img = Image.frombytes("P", size, _pattern(size).astype(np.uint8).tobytes())
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (i * 5) % 256)])
    return _encode(img, "PNG", transparency=0)


def _gif(size: tuple[int, int]) -> bytes:
    first = Image.frombytes("P", size, _pattern(size).astype(np.uint8).tobytes())
    first.putpalette([v for i in range(256) for v in (i, i, 255 - i)])
    second = first.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _encode(first, "GIF", save_all=True, append_images=[second], duration=100)


# name -> (the decoded mode, a maker of the encoded image at a given size)
DECODE_CASES: dict[str, tuple[str, Callable[[tuple[int, int]], bytes]]] = {
    "16-bit grey PNG": ("I;16", lambda s: _encode(Image.fromarray(_pattern(s, hi=65536).astype(np.uint16)), "PNG")),
    "32-bit int TIFF": (
        "I",
        lambda s: _encode(Image.fromarray(_pattern(s, hi=65536).astype(np.int32)), "TIFF", compression="tiff_deflate"),
    ),
    "float TIFF": (
        "F",
        lambda s: _encode(
            Image.fromarray((_pattern(s) / 255.0).astype(np.float32)), "TIFF", compression="tiff_deflate"
        ),
    ),
    "RGBA PNG": ("RGBA", lambda s: _encode(Image.fromarray(_pattern(s, 4).astype(np.uint8), "RGBA"), "PNG")),
    "LA PNG": ("LA", lambda s: _encode(Image.fromarray(_pattern(s, 2).astype(np.uint8), "LA"), "PNG")),
    "CMYK JPEG": ("CMYK", lambda s: _encode(photo(s).convert("CMYK"), "JPEG", quality=90)),  # the same photo
    "palette PNG + tRNS": ("P", _palette_png),
    "1-bit PNG": ("1", lambda s: _encode(Image.fromarray(_pattern(s) > 127), "PNG")),
    "2-frame GIF": ("P", _gif),
    "RGBA WebP": (
        "RGBA",
        lambda s: _encode(Image.fromarray(_pattern(s, 4).astype(np.uint8), "RGBA"), "WEBP", lossless=True, method=0),
    ),
}


def worst_size(mode: str, max_pixels: int) -> tuple[int, int]:
    """The squarest size, at or just under the limits, of an image decoded in ``mode``."""
    pixels = min(max_pixels, RGB_BYTES_PER_PIXEL * max_pixels // bytes_per_pixel(mode))
    w = math.isqrt(pixels)
    return w, pixels // w


def photo(size: tuple[int, int]) -> Image.Image:
    """An RGB image of ``size`` with photo-like content: a synthetic photo repeated."""
    tile = synthetic_image(0, (1024, 768))
    img = Image.new("RGB", size)
    for top in range(0, size[1], tile.height):
        for left in range(0, size[0], tile.width):
            img.paste(tile, (left, top))
    return img


def photo_jpeg(size: tuple[int, int]) -> bytes:
    return _encode(photo(size), "JPEG", quality=90)


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: the peak)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure_decode(path: Path, max_pixels: int) -> dict[str, float]:
    """Decode + preprocess one file in this (fresh) process: seconds, peak RSS and its growth."""
    data = path.read_bytes()
    loader = ImageLoader(Preprocess(), max_pixels=max_pixels)
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from now: imports do not count
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    loader(data)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"seconds": seconds, "growth_bytes": (peak - before) * 1024, "peak_bytes": peak * 1024}


def _in_fresh_process(path: Path, max_pixels: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "decode", "--measure", str(path), "--max-pixels", str(max_pixels)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def _median_row(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def run_decode(args: argparse.Namespace) -> dict[str, Any]:
    if args.measure:
        print(json.dumps(measure_decode(Path(args.measure), args.max_pixels)))
        sys.exit(0)
    names = args.cases or list(DECODE_CASES)
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        files: dict[str, Path] = {}
        sizes: dict[str, tuple[int, int]] = {}
        for name in names:
            mode, make = DECODE_CASES[name]
            sizes[name] = worst_size(mode, args.max_pixels)
            files[name] = Path(tmp) / f"{len(files)}.img"
            files[name].write_bytes(make(sizes[name]))
        jpegs: dict[tuple[int, int], Path] = {}
        for size in sorted(set(sizes.values())):
            jpegs[size] = Path(tmp) / f"jpeg-{size[0]}x{size[1]}.jpg"
            jpegs[size].write_bytes(photo_jpeg(size))
        samples: dict[str, list[dict[str, float]]] = {n: [] for n in [*names, *(f"jpeg {s}" for s in jpegs)]}
        for _ in range(args.rounds):  # each round measures every file once: drift hits all alike
            for size, path in jpegs.items():
                samples[f"jpeg {size}"].append(_in_fresh_process(path, args.max_pixels))
            for name in names:
                samples[name].append(_in_fresh_process(files[name], args.max_pixels))
        rows = []
        for name in names:
            mode, size = DECODE_CASES[name][0], sizes[name]
            row, jpeg = _median_row(samples[name]), _median_row(samples[f"jpeg {size}"])
            rows.append(
                {
                    "case": name,
                    "mode": mode,
                    "size": list(size),
                    "file_bytes": files[name].stat().st_size,
                    **row,
                    "jpeg_bytes": jpegs[size].stat().st_size,
                    "jpeg_seconds": jpeg["seconds"],
                    "jpeg_growth_bytes": jpeg["growth_bytes"],
                    "time_ratio": row["seconds"] / jpeg["seconds"],
                    "memory_ratio": row["growth_bytes"] / max(1.0, jpeg["growth_bytes"]),
                    "within_target": row["seconds"] <= TIME_TARGET * jpeg["seconds"]
                    and row["growth_bytes"] <= MEMORY_TARGET,
                }
            )
    return {"max_pixels": args.max_pixels, "rounds": args.rounds, "rows": rows}


def report_decode(result: dict[str, Any]) -> None:
    print(
        f"decode + preprocess of the largest image each mode may have (max_image_pixels "
        f"{result['max_pixels']:,}), vs an RGB JPEG photo of the same size; median of {result['rounds']} "
        f"fresh processes; target: <= {TIME_TARGET:g}x the JPEG's time, <= {MEMORY_TARGET // MIB} MiB"
    )
    print(
        f"{'case':<20} {'mode':<5} {'size':>11} {'file KiB':>9} {'time s':>7} {'JPEG s':>7} {'x JPEG':>7} "
        f"{'RSS+ MiB':>9} {'JPEG MiB':>9} {'x JPEG':>7}  target"
    )
    for r in result["rows"]:
        print(
            f"{r['case']:<20} {r['mode']:<5} {r['size'][0]:>5}x{r['size'][1]:<5} {r['file_bytes'] / 1024:>9.0f} "
            f"{r['seconds']:>7.2f} {r['jpeg_seconds']:>7.2f} {r['time_ratio']:>7.2f} "
            f"{r['growth_bytes'] / MIB:>9.0f} {r['jpeg_growth_bytes'] / MIB:>9.0f} {r['memory_ratio']:>7.2f}  "
            f"{'ok' if r['within_target'] else 'OVER'}"
        )


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=int, default=Settings().max_image_pixels, help="the limit (default: settings)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per file; the median is reported")
    p.add_argument("--cases", nargs="+", choices=list(DECODE_CASES), help="only these cases")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child: measure one file, print JSON


# -- the command line --------------------------------------------------------------------------------


def _serving() -> Section:
    """The serving section lives in bench_hostile_serving.py (it starts a real server)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_hostile_serving as serving

    return Section(
        "a real server under 200 clients streaming 19 MB bodies, a photo client beside them, 10,000 random paths",
        serving.add_arguments,
        serving.measure,
        serving.print_report,
    )


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    return {"decode": run_decode(args), "serving": SECTIONS["serving"].run(args)}


def report_all(result: dict[str, Any]) -> None:
    SECTIONS["serving"].report(result["serving"])
    print()
    report_decode(result["decode"])


def add_all_arguments(p: argparse.ArgumentParser) -> None:
    add_decode_arguments(p)
    SECTIONS["serving"].add_arguments(p)


SECTIONS: dict[str, Section] = {
    "decode": Section(
        "worst allowed image of each mode vs an RGB JPEG: time and memory",
        add_decode_arguments,
        run_decode,
        report_decode,
    ),
    "serving": _serving(),
}
SECTIONS["all"] = Section(
    "every section, one after the other (the issue's one run)", add_all_arguments, run_all, report_all
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    sub = parser.add_subparsers(dest="section", required=True)
    for name, section in SECTIONS.items():
        section.add_arguments(sub.add_parser(name, help=section.help, parents=[common]))
    args = parser.parse_args(argv)
    section = SECTIONS[args.section]
    result = section.run(args)
    result["machine"] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "numpy": np.__version__,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        section.report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
