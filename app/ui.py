"""The Gradio page: Live (webcam), Image (upload, paste, examples) and Results tabs.

`Handlers` holds the functions the page's events call; they take what Gradio hands over unprocessed
(a webcam frame as the stream sends it, a file's data holding a base64 data URL, or `None` between
frames; an uploaded file's data; the selected variant; the session's `LiveStats`) and return the
page's new values, or a message in the page when the input is bad.
`build(comparison, ...)` lays the page out and wires the events.
"""
from __future__ import annotations

import atexit
import secrets
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import gradio as gr
import numpy as np
from gradio.components.plot import PlotData
from PIL import Image

from app import results as results_mod
from app.examples import DRAWINGS, write_examples
from app.frames import load_data_url, load_image_file, to_rgb
from app.live import Comparison, LiveStats, Reading, file_stamp
from quant.cli import counted

STREAM_EVERY = 0.05   # seconds between webcam frames sent to the server (at most 20 frames/s)
MIRROR_WEBCAM = True  # the preview is a mirror (as people expect); frames are flipped back before the models
STILL_REPEATS = 10    # an uploaded image is timed over this many runs per model (median)
VIEW_SCALE = 4        # the models' view is shown enlarged by this factor (nearest neighbour),
VIEW_MAX = 256        # to at most this many pixels: a 224x224 view is shown as it is
LIVE_VIEWS_KEPT = 100  # a visitor's latest live views kept as files for the page to fetch (5 s of frames)
DELETE_CACHE = (600, 3600)  # every 10 minutes, the files Gradio keeps (uploads, the Image tab's views) over an hour old go


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def model_markdown(r: Reading, last: float, median: float | None, n: int) -> str:
    """One model's card: what it is, its latency, frames per second and size."""
    b = r.backend
    bits = f"{b.bits_per_weight:.2f} bits/weight (whole file)"
    if b.linear_bits is not None:
        bits += f" · linear layers {b.linear_bits:.2f}"
    if median is None:  # a still image: `last` is already the median of n runs
        latency = f"latency **{last:.2f} ms** (median of {n} runs) · up to {1000 / last:.0f} images/s"
    else:
        latency = (f"latency **{last:.2f} ms** last · **{median:.2f} ms** median of {n} frame{'s' * (n != 1)} · "
                   f"up to {1000 / median:.0f} frames/s")
    lines = [f"**{b.name}** · {b.weight_format} · {b.runtime}", latency,
             f"size **{_mb(b.size_bytes)}** · {bits}"]
    if b.note:
        lines.append(f"<small>{b.note}</small>")
    return "<br>".join(lines)


def summary_markdown(fp: Reading, q: Reading, fp_ms: float, q_ms: float, fps: float | None, what: str) -> str:
    speed = fp_ms / q_ms
    size = fp.backend.size_bytes / q.backend.size_bytes
    agree = "agree" if max(fp.top(1), key=fp.top(1).get) == max(q.top(1), key=q.top(1).get) else "disagree"
    line = (f"### quantized vs full precision: {speed:.2f}x {'faster' if speed >= 1 else 'slower'} "
            f"({what} latency) · {size:.1f}x smaller on disk · top-1 {agree}")
    if fps is not None:
        line += f"\nprocessed **{fps:.1f} frames/s**, both models on every frame"
    return line


def view_scale(size: int) -> int:
    """How many times the models' view of `size` pixels is enlarged on the page (a 224x224 view enlarged 4x
    would cost the live stream a 896x896 image to encode every frame)."""
    return max(1, min(VIEW_SCALE, VIEW_MAX // size))


def _enlarge(view: np.ndarray) -> np.ndarray:
    k = view_scale(len(view))
    return view.repeat(k, axis=0).repeat(k, axis=1)


def _view_file(view: np.ndarray, frame: int, folder: Path) -> str:
    """The live view of a visitor's `frame` written as its own file in the visitor's `folder`, and the one
    LIVE_VIEWS_KEPT frames back removed: Gradio would keep a copy of every frame's image (20 a second a visitor)
    in its cache for the server's life."""
    folder.mkdir(exist_ok=True)
    path = folder / f"{frame}.webp"
    Image.fromarray(view).save(path)
    (folder / f"{frame - LIVE_VIEWS_KEPT}.webp").unlink(missing_ok=True)
    return str(path)


def _upload_path(upload) -> str | None:
    """The file path in what an Image input hands over unprocessed (FileData dict), or a plain path."""
    if upload is None:
        return None
    if isinstance(upload, (str, Path)):
        return str(upload)
    if isinstance(upload, dict) and isinstance(upload.get("path"), str):
        return upload["path"]
    raise ValueError("the page sent something that is not an uploaded file")


def _frame_rgb(frame) -> np.ndarray:
    """A webcam frame as the stream hands it over unprocessed (a FileData dict holding a base64 data URL or
    a file path) or as an array or PIL image (the benchmark, tests) -> uint8 RGB (H, W, 3)."""
    if isinstance(frame, dict):
        if isinstance(frame.get("url"), str) and frame["url"].startswith("data:"):
            return load_data_url(frame["url"])
        return load_image_file(_upload_path(frame))
    return to_rgb(frame)


class Handlers:
    """The page's event functions over one `Comparison` (shared by every visitor)."""

    def __init__(self, comparison: Comparison):
        self.cmp = comparison

    def live(self, frame, variant: str | None, stats: LiveStats | None):
        """A webcam frame -> (model view, FP top-3, FP card, quantized top-3, quantized card, summary, stats).

        `None` (between stream events) leaves the page as it is; a frame that cannot be read leaves
        the results and says why in the summary."""
        stats = stats if isinstance(stats, LiveStats) else LiveStats()
        if frame is None:
            return (gr.skip(),) * 6 + (stats,)
        try:
            rgb = _frame_rgb(frame)
            if stats.variant != (variant or self.cmp.default):
                stats.reset(variant or self.cmp.default)
            view, fp, q = self.cmp.run(rgb, variant, MIRROR_WEBCAM, frame_index=stats.frames)
        except (ValueError, OSError) as e:  # OSError: a variant's file gone or its cache unwritable since start
            return (gr.skip(),) * 5 + (f"⚠ {e}", stats)
        stats.fp.add(fp.latency_ms)
        stats.quant.add(q.latency_ms)
        stats.tick()
        n = len(stats.fp.ms)
        return (_enlarge(view),
                fp.top(), model_markdown(fp, fp.latency_ms, stats.fp.median, n),
                q.top(), model_markdown(q, q.latency_ms, stats.quant.median, n),
                summary_markdown(fp, q, stats.fp.median, stats.quant.median, stats.fps,
                                 f"median over {n} frame{'s' * (n != 1)}"),
                stats)

    def still(self, upload, variant: str | None):
        """An uploaded or pasted image -> (model view, FP top-3, FP card, quantized top-3, quantized card, summary).

        Each model is timed over STILL_REPEATS runs (median). A file that is not a readable image
        clears the results and says why."""
        empty = (None, None, "", None, "")
        try:
            path = _upload_path(upload)
            if path is None:
                return empty + ("Upload, paste or pick an image.",)
            view, fp, q = self.cmp.run(load_image_file(path), variant, repeats=STILL_REPEATS)
        except (ValueError, OSError) as e:
            return empty + (f"⚠ {e}",)
        return (_enlarge(view),
                fp.top(), model_markdown(fp, fp.latency_ms, None, STILL_REPEATS),
                q.top(), model_markdown(q, q.latency_ms, None, STILL_REPEATS),
                summary_markdown(fp, q, fp.latency_ms, q.latency_ms, None, f"median of {STILL_REPEATS} runs"))


def _results_outputs(folder: Path):
    res = results_mod.load(folder)
    cms = res.having("confusion")
    allocs = res.having("allocation")
    robust = res.having("robustness")
    cm_choice = cms[0].label if cms else None
    alloc_choice = allocs[0].label if allocs else None
    return (results_mod.summary(res),
            _plot(results_mod.accuracy_vs_bits(res)), _plot(results_mod.latency_bars(res)),
            _plot(results_mod.size_bars(res)), _plot(results_mod.fps_bars(res)),
            gr.update(choices=results_mod.labels(cms), value=cm_choice, visible=bool(cms)),
            _plot(results_mod.confusion_plot(cms[0]) if cms else None),
            gr.update(choices=results_mod.labels(allocs), value=alloc_choice, visible=bool(allocs)),
            _plot(results_mod.allocation_plot(allocs[0]) if allocs else None),
            gr.update(choices=results_mod.labels(robust), value=robust[0].label if robust else None,
                      visible=bool(robust)),
            _plot(results_mod.robustness_plot(robust[0]) if robust else None))


def _stamp(folder: Path) -> tuple:
    """The results files as they are now: each `*.json`'s name and `file_stamp` (None for one that vanished
    meanwhile)."""
    return tuple((path.name, file_stamp(path)) for path in sorted(folder.glob("*.json")))


def _plot(fig):
    return gr.update(value=fig, visible=fig is not None)


class _NamedPlot(PlotData):
    """A drawn plot that names itself: Gradio's page makes `chart` the image's alt text ("<chart> plot visualising
    provided data"), which for a matplotlib figure, holding none, a screen reader reads as "undefined plot ..."."""
    chart: str


def _named(plot: PlotData | None, label: str) -> _NamedPlot | None:
    return plot and _NamedPlot(**plot.model_dump(), chart=label)


def _pick(folder: Path, prop: str, label: str | None, draw):
    entries = results_mod.load(folder).having(prop)
    entries = dict(zip(results_mod.labels(entries), entries))
    return _plot(draw(entries[label]) if label in entries else None)


def build(comparison: Comparison, variant_labels: list[str], results_dir: str | Path,
          skipped: list[str] = ()) -> gr.Blocks:
    """The app's page over `comparison`; `variant_labels` fill the quantized-model menu; `skipped` names the
    model files left out, and why."""
    h = Handlers(comparison)
    fp = comparison.fp
    s = comparison.size
    enlarged = ", enlarged" if view_scale(s) > 1 else ""
    seen = f"the picture as the models see it: resized and centre-cropped to {s}x{s} pixels{enlarged}"
    classes = fp.config.classes
    results_dir = Path(results_dir)
    examples_dir = Path(tempfile.mkdtemp(prefix="bitvit-examples-"))  # in the temp folder, which Gradio serves
    atexit.register(shutil.rmtree, examples_dir, ignore_errors=True)  # not one more folder left at every start
    # drawings of CIFAR-10 subjects, for a model that names one of them or names none (ImageNet's): to a model of
    # other classes (a user's own data set's) they would be pictures it has no class for. Named in any case: an
    # image tree's folders name the classes, "Airplane" as well as "airplane"
    offer_drawings = not classes or any(c.lower() in DRAWINGS for c in classes)
    examples = write_examples(examples_dir) if offer_drawings else []
    live_views = Path(tempfile.mkdtemp(prefix="bitvit-live-"))  # served from there, not copied into Gradio's cache
    atexit.register(shutil.rmtree, live_views, ignore_errors=True)
    gr.set_static_paths([live_views])

    def own_folder(stats: LiveStats) -> Path:
        """The visitor's folder, named at random on their first frame (not in the initial state, which Gradio copies
        to every session, nor from the state's address, which a later visitor's may take): no visitor can guess
        or inherit another's. It is removed when the session's state goes: Gradio deletes a closed tab's after an
        hour, and drops the oldest past `state_session_capacity` without calling a delete callback."""
        if stats.views is None:
            stats.views = secrets.token_hex(16)
            weakref.finalize(stats, shutil.rmtree, live_views / stats.views, ignore_errors=True)
        return live_views / stats.views

    def live(frame, variant, stats):
        out = h.live(frame, variant, stats)
        if isinstance(out[0], np.ndarray):
            out = (_view_file(out[0], out[-1].frames, own_folder(out[-1])),) + out[1:]
        return out

    with gr.Blocks(title="bitvit: full precision vs quantized ViT", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            f"# bitvit: a full-precision and a quantized Vision Transformer, side by side\n"
            f"Both models classify the same frames, one after the other in the same call on this machine's "
            f"CPU. The models see **{s}x{s} pixels**: every frame is resized (shorter side to {s}) and "
            f"centre-cropped, as their training images were; the small picture shows exactly what they see. "
            f"Classes: {', '.join(classes) or f'{fp.config.num_classes}, unnamed (shown by number)'}.\n\n"
            f"Full precision: **{fp.name}** ({fp.weight_format}, {fp.runtime}, {_mb(fp.size_bytes)})."
            + (f" <small>{fp.note}</small>" if fp.note else ""))
        variant = gr.Dropdown(variant_labels, value=comparison.default, label="quantized model",
                              info="the packed models found in the models folder", elem_id="variant")
        if skipped:
            with gr.Accordion(f"{counted(len(skipped), 'model file')} left out", open=False):
                gr.Markdown("\n".join(f"- {line}" for line in skipped))

        def outputs(prefix: str):
            with gr.Row():
                with gr.Column(scale=1):
                    fp_label = gr.Label(num_top_classes=3, label="full precision", elem_id=f"{prefix}-fp-label")
                    fp_md = gr.Markdown(elem_id=f"{prefix}-fp-stats")
                with gr.Column(scale=1):
                    q_label = gr.Label(num_top_classes=3, label="quantized", elem_id=f"{prefix}-q-label")
                    q_md = gr.Markdown(elem_id=f"{prefix}-q-stats")
            summary = gr.Markdown(elem_id=f"{prefix}-summary")
            return fp_label, fp_md, q_label, q_md, summary

        with gr.Tab("Live"):
            with gr.Row():
                webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="webcam",
                                  webcam_options=gr.WebcamOptions(mirror=MIRROR_WEBCAM), elem_id="webcam")
                live_view = gr.Image(label=f"what the models see ({s}x{s}{enlarged})", interactive=False,
                                     height=s * view_scale(s) + 60, elem_id="live-view", alt_text=seen)
            live_out = outputs("live")
            stats = gr.State(LiveStats())
            # frames come unprocessed (preprocess=False), so the app checks a frame's size before decoding
            # it, as /classify does for uploads; the stream is the page's own, not a listed API endpoint.
            # A stream holds its worker until its webcam stops: with a limit, the next visitor's would wait
            # in the queue all that time; the handler is safe to run for several visitors at once
            webcam.stream(live, [webcam, variant, stats], [live_view, *live_out, stats],
                          stream_every=STREAM_EVERY, concurrency_limit=None, show_progress="hidden",
                          api_name=False, preprocess=False)

        with gr.Tab("Image"):
            with gr.Row():
                still = gr.Image(sources=["upload", "clipboard"], type="filepath", image_mode=None,
                                 label="upload or paste an image", elem_id="still", alt_text="the image to classify")
                still_view = gr.Image(label=f"what the models see ({s}x{s}{enlarged})", interactive=False,
                                      height=s * view_scale(s) + 60, elem_id="still-view", alt_text=seen)
            if examples:
                # Gradio gives an example's picture no alt text and its button no name: the label names them in order
                gr.Examples([[str(p)] for p in examples], inputs=[still],
                            label=f"drawn examples (not CIFAR images): {', '.join(p.stem for p in examples)}")
            still_out = outputs("still")
            # preprocess=False: the handler decodes the file itself, so a bad upload gets a message. One queue
            # for both events: a visitor's upload and variant change are answered in the order made (the page
            # ends on the variant chosen last), and no two images are timed at once
            still.change(h.still, [still, variant], [still_view, *still_out], preprocess=False,
                         api_name="classify", concurrency_id="still")
            variant.change(h.still, [still, variant], [still_view, *still_out], preprocess=False,
                           api_name=False, concurrency_id="still")

        with gr.Tab("Results"):
            acc_plot = gr.Plot(label="accuracy against bits per weight")
            lat_plot = gr.Plot(label="latency")
            size_plot = gr.Plot(label="size on disk")
            fps_plot = gr.Plot(label="app frame rate")
            cm_pick = gr.Dropdown(label="confusion matrix of")
            cm_plot = gr.Plot(label="confusion matrix")
            alloc_pick = gr.Dropdown(label="Q-ViT bit allocation of")
            alloc_plot = gr.Plot(label="bit allocation")
            robust_pick = gr.Dropdown(label="robustness analysis of")
            robust_plot = gr.Plot(label="where the bits matter: one component quantized at a time")
            res_md = gr.Markdown(elem_id="results-files")  # below the plots: a page of them (a phone's three) above
            reload = gr.Button("Reload results")
            res_outputs = [res_md, acc_plot, lat_plot, size_plot, fps_plot, cm_pick, cm_plot, alloc_pick, alloc_plot,
                           robust_pick, robust_plot]
            drawn, drawing = {}, threading.Lock()

            def cached(key, make, outputs, again=False):
                """make()'s values for `outputs`, plots encoded as the page gets them, kept while the results files
                stay as they are (`again`: made anew): drawn for every page load, they cost seconds of CPU a visit."""
                with drawing:
                    stamp = _stamp(results_dir)
                    if again or drawn.get("stamp") != stamp:
                        drawn.clear()
                        drawn["stamp"] = stamp
                    if key not in drawn:
                        drawn[key] = [{**v, "value": _named(c.postprocess(v["value"]), c.label)}
                                      if isinstance(c, gr.Plot) else v for v, c in zip(make(), outputs)]
                    return [dict(v) if isinstance(v, dict) else v for v in drawn[key]]  # (Gradio pops their values)

            tab = lambda: _results_outputs(results_dir)  # noqa: E731
            demo.load(lambda: cached("tab", tab, res_outputs), None, res_outputs, api_name=False)
            reload.click(lambda: cached("tab", tab, res_outputs, again=True), None, res_outputs, api_name=False)

            def pick(prop, plot, draw):  # a menu's plot of the entry picked (on every page load, the first)
                return lambda label: cached((prop, label), lambda: [_pick(results_dir, prop, label, draw)], [plot])[0]
            cm_pick.change(pick("confusion", cm_plot, results_mod.confusion_plot),
                           cm_pick, cm_plot, api_name=False)
            alloc_pick.change(pick("allocation", alloc_plot, results_mod.allocation_plot), alloc_pick, alloc_plot,
                              api_name=False)
            robust_pick.change(pick("robustness", robust_plot, results_mod.robustness_plot), robust_pick, robust_plot,
                               api_name=False)
    demo.examples_dir = examples_dir
    return demo
