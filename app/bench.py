"""`python -m app.bench`: frames per second of the app's live handler, both models on every frame.

Feeds the same recorded webcam clip -- synthetic 640x480 frames of the drawn examples sliding over a
noisy background, made before timing starts -- through `Handlers.live`, exactly what the page calls for
each webcam frame (decode, resize/crop to the models' view, FP model, quantized model, page text), for
each pair: the full-precision model against every quantized variant the app would offer of the same
architecture (the models in `--assets`, or the ones it builds on the fly when there are none of it); the
menu's models of another architecture are left out, as a speed-up or size ratio against them would
compare two different networks. Prints a table and writes
`--out` (JSON: command, machine, load average, date, wall time and per pair frames/s, median
latencies and `other_ms_per_frame`, the median over frames of the handler's time outside the two
models; by default the shipped `assets/results/app_bench.json`, which only the default run may
write). The target: >= 15 frames/s for the default pair on a 2-core CPU. Latency on a busy machine
is noisy: the JSON records the load average before and after, so a reader knows whether it was quiet.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from tqdm import tqdm

from app.examples import DRAWINGS
from app.frames import MAX_PIXELS
from app.live import LiveStats
from app.main import ASSETS, OTHER, make_comparison, open_default, writable_cache
from quant.cli import (HelpFormatter, counted, load_average, output_file, positive_int, provenance, run, thread_count,
                       write_json)

TARGET_FPS = 15
MAX_CLIP_BYTES = 4 << 30  # the recorded clip, held in memory


def recorded_clip(n: int, height: int, width: int) -> list[np.ndarray]:
    """`n` uint8 RGB webcam-like frames: the drawn examples in turn, sliding across, with sensor noise."""
    rng = np.random.default_rng(0)
    side = min(height, width)
    drawings = [np.asarray(draw().resize((side, side))) for draw in DRAWINGS.values()]
    frames = []
    for i in range(n):
        f = np.full((height, width, 3), 110, np.int16)
        x = (7 * i) % (width - side + 1)
        f[:side, x:x + side] = drawings[(i // 30) % len(drawings)]
        f += rng.integers(-12, 13, f.shape, dtype=np.int16)
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return frames


def bench_pair(handlers, variant: str, frames: list[np.ndarray]) -> dict:
    """Every frame through the live handler of `handlers`, the page's `app.ui.Handlers` (as the page calls it);
    frames/s over the timed frames."""
    stats = LiveStats()
    def live(frame, stats):
        out = handlers.live(frame, variant, stats)
        if str(out[-2]).startswith("⚠"):  # the page's message for a refused frame: no latency to record
            raise ValueError(str(out[-2])[1:].strip())
        return out[-1]
    for f in frames[:5]:  # warm-up
        stats = live(f, stats)
    fp_ms, q_ms, other_ms = [], [], []
    t0 = time.perf_counter()
    for f in tqdm(frames, desc=variant[:40], leave=False):
        t = time.perf_counter()
        stats = live(f, stats)
        fp_ms.append(stats.fp.last)
        q_ms.append(stats.quant.last)
        other_ms.append(1e3 * (time.perf_counter() - t) - fp_ms[-1] - q_ms[-1])  # the handler's time around the models
    wall = time.perf_counter() - t0
    fp, q = handlers.cmp.fp, handlers.cmp.variant(variant)
    fp_med, q_med = statistics.median(fp_ms), statistics.median(q_ms)
    return {"name": f"{fp.weight_format} + {q.weight_format} ({q.runtime})", "variant": variant,
            "fp": {"file": fp.name, "runtime": fp.runtime, "file_bytes": fp.size_bytes},
            "quant": {"file": q.name, "runtime": q.runtime, "weight_format": q.weight_format,
                      "file_bytes": q.size_bytes, "file_bits_per_weight": round(q.bits_per_weight, 3),
                      "linear_bits": q.linear_bits, "note": q.note},
            "frames": len(frames), "fps": round(len(frames) / wall, 2),
            "fp_median_ms": round(fp_med, 3), "quant_median_ms": round(q_med, 3),
            "speedup": round(fp_med / q_med, 3), "size_ratio": round(fp.size_bytes / q.size_bytes, 2),
            "other_ms_per_frame": round(statistics.median(other_ms), 3)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--fp", help="full-precision model (default: assets/vit_cifar_small.safetensors; with another "
                                "--assets, the first full-precision model there)")
    p.add_argument("--assets", default=str(ASSETS), help="folder of packed models (default: assets/)")
    p.add_argument("--frames", type=positive_int, default=300, help="timed frames per pair (default 300)")
    p.add_argument("--size", default="640x480", help="frame size WxH (default 640x480, a webcam's)")
    p.add_argument("--threads", type=thread_count, help="CPU threads per model (default: all cores)")
    p.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime",
                   help="how bitvit .safetensors models run (default: onnxruntime, as in the app)")
    p.add_argument("--out", help="JSON results file (default assets/results/app_bench.json, the shipped results "
                                 "of the default run, which a run with other options must not overwrite: it needs --out)")
    args = p.parse_args(argv)
    if args.out is None:
        changed = [f"--{k}" for k, v in vars(args).items() if k != "out" and v != p.get_default(k)]
        if changed:
            raise ValueError(f"a run with {', '.join(changed)} needs --out FILE: the default, "
                             f"assets/results/app_bench.json, holds the shipped results of the default run")
        args.out = str(ASSETS / "results" / "app_bench.json")
    output_file(args.out, ".json")
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size takes WxH, e.g. 640x480, not {args.size!r}") from None
    if w < 1 or h < 1:
        raise ValueError("--size must be positive")
    if w * h > MAX_PIXELS:
        raise ValueError(f"--size {args.size} is over the {MAX_PIXELS / 1e6:.0f} megapixels the app takes")
    if args.frames * w * h * 3 > MAX_CLIP_BYTES:  # the clip is drawn into memory before the timing
        raise ValueError(f"--frames {args.frames} of {w}x{h} would take {args.frames * w * h * 3:,} bytes of "
                         f"memory; the clip is held to {MAX_CLIP_BYTES >> 30} GiB ({MAX_CLIP_BYTES:,} bytes)")

    writable_cache()  # as the app: the models' exports and the ones it quantizes need it
    start, load_before = time.time(), load_average()
    print("opening the models (a first run also exports them to ONNX and may build bitvit's ops: a minute or so)...")
    comparison, labels, skipped = make_comparison(args.fp, None, args.assets, args.threads, args.runtime,
                                                  has_quant_option=False)
    labels = open_default(comparison, labels, skipped, explicit=False)  # the app's default, as the app opens it
    order = [label for label in [comparison.default] + labels if OTHER not in label]
    order = list(dict.fromkeys(order))  # the default pair first
    for label in order[1:]:  # a file the app would leave out of its menu (damaged) is left out here too
        try:
            comparison.variant(label)
        except (ValueError, OSError) as e:
            skipped.append(f"{label}: {e}")
            order.remove(label)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    for label in (x for x in labels if OTHER in x):
        print(f"left out {label}: not a quantized version of the FP model", file=sys.stderr)
    if not order:
        raise ValueError(f"no quantized model of {comparison.fp.name}'s architecture in {args.assets} to time it "
                         f"against (make one with python -m quant.ptq or quant.qat)")
    from app.ui import Handlers  # gradio's import: seconds, which --help and a refused argument need not wait
    handlers = Handlers(comparison)
    frames = recorded_clip(args.frames, h, w)
    rows = [bench_pair(handlers, label, frames) for label in order]
    for backend in [comparison.fp] + [handlers.cmp.variant(label) for label in order]:
        if backend.note:  # e.g. a model that runs in torch because ONNX Runtime could not take it
            print(f"note, {backend.name}: {backend.note}", file=sys.stderr)
    load_after = load_average()
    loads = [f"{load[0]:.2f}" if load else "n/a" for load in (load_before, load_after)]  # n/a: Windows keeps none

    print(f"\napp live handler, {counted(args.frames, 'frame')} of {w}x{h}, both models on every frame "
          f"(load average {loads[0]} before, {loads[1]} after; {counted(os.cpu_count(), 'CPU')})")
    width = max(len("quantized variant"), *(len(r["variant"]) + len(" (default)") for r in rows))
    print(f"{'quantized variant':<{width}} {'frames/s':>8} {'FP ms':>7} {'quant ms':>8} {'speed-up':>8} "
          f"{'smaller':>7} {'other ms':>8}")
    for i, r in enumerate(rows):
        mark = " (default)" if i == 0 else ""
        print(f"{r['variant'] + mark:<{width}} {r['fps']:>8.1f} {r['fp_median_ms']:>7.2f} "
              f"{r['quant_median_ms']:>8.2f} {r['speedup']:>7.2f}x "
              f"{r['fp']['file_bytes'] / r['quant']['file_bytes']:>6.1f}x "  # not the recorded ratio, rounded already
              f"{r['other_ms_per_frame']:>8.2f}")
    verdict = "meets" if rows[0]["fps"] >= TARGET_FPS else "misses"
    print(f"default pair: {rows[0]['fps']:.1f} frames/s, {verdict} the {TARGET_FPS} frames/s target")

    write_json(args.out, {
        **provenance("app.bench", argv), "threads": args.threads or "all", "runtime": args.runtime,
        "load_average_before": load_before and round(load_before[0], 2),
        "load_average_after": load_after and round(load_after[0], 2),
        "split": f"synthetic {w}x{h} frames (drawn examples, no data set)",
        "wall_time_s": round(time.time() - start, 1), "target_fps": TARGET_FPS, "pairs": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(run(main))
