"""`python app/main.py [--host H] [--port 7860] [--share] [--fp MODEL] [--quant MODEL]`: bitvit's webcam demo.

Serves the Gradio page (Live, Image and Results tabs) comparing a full-precision ViT with a quantized
one, on the models in `assets/` and with no network. `--fp` defaults to the GPU-trained reference,
`assets/vit_cifar_small.safetensors`; the quantized menu lists every packed model in `assets/` (plus
`--quant`, which is also the default choice; otherwise a ternary model of the FP model's architecture
when there is one, else another of its architecture). With no packed model of its architecture, the app
quantizes the FP model itself (`quant.quantize` with the round-to-nearest recipes w8a8, when it starts, and
w4, when first chosen; saved in the bitvit cache) and says so on the page. Host and port default to what Hugging Face Spaces
expects (0.0.0.0:7860, or $GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (`python app/main.py`, and on Spaces): app/ is not installed
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import atexit  # noqa: E402
import functools  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from quant.cli import HelpFormatter, counted, run, thread_count  # noqa: E402

ASSETS = ROOT / "assets"
DEFAULT_FP = ASSETS / "vit_cifar_small.safetensors"
OTHER = "other architecture than the FP model"  # in the menu label of a packed model of another architecture


def make_comparison(fp: str | Path | None, quant: str | Path | None, assets: str | Path = ASSETS,
                    threads: int | None = None, runtime: str | None = None, has_quant_option: bool = True):
    """(Comparison, variant labels, skipped-file notes) for the FP model and every packed model found
    (`has_quant_option`: whether the command asking has a --quant option to suggest)."""
    from app.backends import ON_THE_FLY, RUNTIME, inspect_file, open_model, scan
    from app.live import Comparison
    runtime = runtime or RUNTIME
    if Path(assets).is_file():  # (said to be no such folder, it was taken for a typo)
        raise ValueError(f"{assets} is a file; --assets takes the folder of models to compare with"
                         + (" (one quantized model: --quant FILE)" if has_quant_option else ""))
    if not Path(assets).is_dir():
        raise FileNotFoundError(f"no such models folder: {assets}")
    found, skipped = scan(assets)
    if fp is not None:
        fp_file = inspect_file(fp)
        if fp_file.kind != "fp":
            raise ValueError(f"--fp {fp} is a {fp_file.weight_format} model, not a full-precision one")
        fp_backend = open_model(fp, threads, runtime)
    else:  # the shipped reference, or the first FP file of the folder that opens
        fps = sorted((m.path for m in found if m.kind == "fp"),  # .safetensors first (the app can quantize them),
                     key=lambda p: p.suffix.lower() != ".safetensors")  # then ONNX exports (a folder of python -m export's)
        if Path(DEFAULT_FP).is_file() and Path(assets).resolve() == ASSETS.resolve():
            fps = [DEFAULT_FP] + [p for p in fps if p.resolve() != DEFAULT_FP.resolve()]
        for fp in fps:
            try:
                fp_backend = open_model(fp, threads, runtime)
                break
            except (ValueError, OSError) as e:
                skipped.append(f"{Path(fp).name}: {e}")
        else:
            raise FileNotFoundError(f"no full-precision model in {assets} that opens: pass --fp MODEL "
                                    f"(a bitvit .safetensors file or ONNX export)")
        fp_file = inspect_file(fp)
    variants = [m for m in found if m.kind == "quant"]
    if quant is not None:
        q = inspect_file(quant)
        if q.kind != "quant":
            raise ValueError(f"--quant {quant} is a full-precision model, not a quantized one")
        variants = [q] + [m for m in variants if m.path.resolve() != q.path.resolve()]
    keep = []

    def named(c) -> str:  # (a timm head fine-tuned to other data names none)
        return f"classes {', '.join(c.classes)}" if c.classes else f"{c.num_classes} unnamed classes"
    for m in variants:
        a, b = fp_file.config, m.config
        if (a.img_size, a.num_classes, a.classes) != (b.img_size, b.num_classes, b.classes):
            differ = (f"{named(b)}, the FP model's {named(a)}"
                      if (a.img_size, a.num_classes) == (b.img_size, b.num_classes) else  # (ImageNet configs name none)
                      f"{b.img_size}x{b.img_size} images of {b.num_classes} classes, the FP model "
                      f"{a.img_size}x{a.img_size} of {a.num_classes}")
            why = f"{m.path.name}: takes {differ}: not comparable"
            if quant is not None and m is variants[0]:
                raise ValueError(f"--quant {why}")
            skipped.append(why)
        else:
            keep.append(m)
    arch = lambda c: (c.patch_size, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, c.stem_channels)  # noqa: E731
    own, openers = [], {}  # own: the menu labels of the FP model's architecture
    for m in keep:
        label = m.label
        if label in openers:  # a --quant file named like one in the folder: tell them apart by folder
            label += f" · in {m.path.parent}"
        if arch(m.config) != arch(fp_file.config):
            label += f" · {OTHER} (depth {m.config.depth}, width {m.config.embed_dim})"
        else:
            own.append((label, m.weight_format))
        openers[label] = functools.partial(open_model, m.path, threads, runtime)
    if not own and Path(fp).suffix.lower() == ".safetensors":  # none of its network: quantize it here (round to
        for name in ON_THE_FLY:  # nearest), saved in the cache; a ratio to another network means little
            label = (f"{name} · built on the fly from {Path(fp).name} "
                     f"(PTQ, no comparable packed model in {Path(assets).name}/)")
            openers[label] = functools.partial(_on_the_fly, fp, name, threads, runtime)
            own.append((label, name))
    if not openers:
        raise ValueError(f"no quantized model in {assets} to compare {Path(fp).name} with, and the app can only "
                         f"quantize a .safetensors model itself: " + ("pass --quant MODEL" if has_quant_option else
                         f"put a quantized bitvit model of it (.safetensors or .onnx) in {assets}"))
    labels = list(openers)
    default = labels[0] if quant is not None else next(  # of the FP model's architecture: a ternary one first
        (label for label, fmt in own if "ternary" in fmt.split("+")), own[0][0] if own else labels[0])
    return Comparison(fp_backend, openers, default), labels, skipped


def _on_the_fly(fp, recipe: str, threads, runtime):
    from app.backends import open_model, quantize_on_the_fly
    path = quantize_on_the_fly(fp, recipe)
    try:
        backend = open_model(path, threads, runtime)
    except (ValueError, OSError):  # a cached file damaged since it was built: built again
        backend = open_model(quantize_on_the_fly(fp, recipe, again=True), threads, runtime)
    backend.note = (f"quant.quantize(model, {recipe!r}) of {Path(fp).name}, round to nearest, built by the app "
                    f"(the models folder holds no packed model comparable with it); " + backend.note).rstrip("; ")
    return backend


def open_default(comparison, labels: list[str], skipped: list[str], explicit: bool) -> list[str]:
    """Open (or build) and warm the default quantized variant now, not on the first frame. One that does not
    open (a damaged file the scan's header reading let through) leaves the menu with a note in `skipped`,
    and the next one becomes the default; a `--quant` the user named must open. Returns the menu's labels."""
    failed = []
    others = sorted((x for x in labels if x != comparison.default), key=lambda x: OTHER in x)
    for label in [comparison.default] + others:  # then those of the FP model's architecture first
        try:
            comparison.variant(label)
        except (ValueError, OSError) as e:
            if explicit and label == comparison.default:
                raise
            skipped.append(f"{label}: {e}")
            failed.append(label)
            del comparison.openers[label]
            continue
        comparison.default = label
        return [x for x in labels if x not in failed]
    raise ValueError("none of the quantized models opens: " + "; ".join(skipped[-len(failed):]))


def check_port_free(host: str, number: int) -> None:
    """One clear error now, not after minutes of loading models, if the server could not listen on
    host:number (another program may still take the port between this check and the server's start)."""
    import errno
    import socket
    host = host.strip("[]")  # an IPv6 address may come bracketed
    where = f"[{host}]:{number}" if ":" in host else f"{host}:{number}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server: TIME_WAIT is no conflict
            s.bind(address)
    except OSError as e:
        hint = (": pass --port with a free port, or stop what holds it" if e.errno == errno.EADDRINUSE
                else " (is --host, or $GRADIO_SERVER_NAME without it, an address of this machine?)")
        raise ValueError(f"cannot listen on {where} ({e.strerror or e}){hint}") from None


def writable_cache() -> None:
    """Point $BITVIT_CACHE at a temporary folder for this run, with a warning, where the bitvit cache cannot be
    written (a read-only home, or none): there the models' ONNX exports, bitvit's ops and the models the app
    quantizes itself would have nowhere to go, and every model would run in torch, the quantized ones slower
    than the FP model. Where it can be written, its old code versions' files go (`app.backends.tidy_cache`). The
    app and `app.bench` call it before they open any model."""
    from app.backends import tidy_cache
    from quant.data import cache_dir
    folder = None
    try:
        folder = cache_dir() / "app"
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # a read-only folder that exists already is no place either
    except (OSError, ValueError) as e:  # cache_dir's refusals name the folder; an OSError's reason alone does not
        why = f"{folder}: {e.strerror}" if folder is not None and getattr(e, "strerror", None) else e
    else:
        tidy_cache()
        return
    tmp = tempfile.mkdtemp(prefix="bitvit-cache-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    os.environ["BITVIT_CACHE"] = tmp
    print(f"warning: cannot write the bitvit cache ({why}); the models' ONNX exports and the models the app quantizes "
          f"go to {tmp} for this run only (set BITVIT_CACHE to a writable folder)", file=sys.stderr)


def server_name(host: str) -> str:
    """--host as the server takes it: an IPv6 address bracketed (Gradio builds its own URL of host and port from
    it, and `::1` unbracketed reads as host `:` and port `:1:7860`), anything else as given."""
    bare = host.strip("[]")
    return f"[{bare}]" if ":" in bare else host


def port(text: str) -> int:
    """argparse type for --port: an integer in 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 1..65535, got {text!r}")
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python app/main.py", description="bitvit's demo page: a full-precision and a "
                                "quantized ViT classify the same webcam frames or images side by side.",
                                formatter_class=HelpFormatter)
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                   help="address to listen on (default: $GRADIO_SERVER_NAME or 0.0.0.0)")
    p.add_argument("--port", type=port,
                   help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    p.add_argument("--fp", help="full-precision model (default: assets/vit_cifar_small.safetensors; with another "
                                "--assets, the first full-precision model there)")
    p.add_argument("--quant", help="quantized model to select first (.safetensors or .onnx; default: "
                                   "a ternary model from assets/)")
    p.add_argument("--assets", default=str(ASSETS), help="folder of models to offer (default: assets/)")
    p.add_argument("--results", help="results folder for the Results tab (default: <assets>/results)")
    p.add_argument("--threads", type=thread_count, help="CPU threads per model (default: all cores)")
    args = p.parse_args(argv)
    if args.port is None:  # checked here, so that a bad value is blamed on the variable, not on --port
        try:
            args.port = port(os.environ.get("GRADIO_SERVER_PORT", "7860"))
        except argparse.ArgumentTypeError as e:
            p.error(f"$GRADIO_SERVER_PORT: {e}")

    if args.results is not None and not Path(args.results).is_dir():
        raise FileNotFoundError(f"--results {args.results}: no such folder (the Results tab shows the results "
                                f"files of a folder)")
    check_port_free(args.host, args.port)  # before minutes of loading and warming models
    writable_cache()
    print("opening the models (a first start also exports them to ONNX and may build bitvit's ops: a minute or "
          "so)...")  # (stdout: stderr stays one error line for a model that does not open)
    from app.ui import build  # gradio's import: seconds
    comparison, labels, skipped = make_comparison(args.fp, args.quant, args.assets, args.threads)
    labels = open_default(comparison, labels, skipped, explicit=args.quant is not None)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    demo = build(comparison, labels, args.results or Path(args.assets) / "results", skipped)
    print(f"full precision: {comparison.fp.name} ({comparison.fp.runtime}); quantized: "
          f"{counted(len(labels), 'variant')}, default {comparison.default}")
    demo.queue(default_concurrency_limit=1).launch(
        server_name=server_name(args.host), server_port=args.port, share=args.share, show_error=True,
        allowed_paths=[str(demo.examples_dir)], max_file_size="50mb", prevent_thread_lock=True)
    try:  # serving till Ctrl+C or SIGTERM (gradio's own wait would catch them and return: exit code 0, as if done)
        while demo.is_running:
            time.sleep(0.1)
    finally:
        demo.close()  # then `run` ends as every interrupted command: 'interrupted', code 130


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # the address reaches a log file or a container's log as it is printed
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped as by Ctrl+C: the temporary folders are removed
    raise SystemExit(run(main))
