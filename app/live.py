"""Both models on every frame: the side-by-side comparison behind the app's Live and Image tabs.

`Comparison` holds the full-precision backend and the quantized variants (opened on first use and
kept; one that fails to open keeps its error until its file changes). `Comparison.run(rgb, variant)`
turns one frame into the models' 32x32 (or whatever the models take) view and runs both models on it,
one after the other in the same call, so they see the same input on the same, equally busy CPU; the
order alternates from frame to frame. `LiveStats` keeps one browser session's sliding windows: each
model's latencies and the times frames were processed.
"""
from __future__ import annotations

import copy
import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from app.backends import Backend
from app.frames import model_view
from quant.data import class_names, to_model_array

TOP_K = 3
WINDOW = 30  # frames in the sliding windows of latency and frame rate
PAUSED = 10  # a gap between frames over 10 times the window's median gap, and over a second, is a webcam stopped
             # and started again: the frame rate starts afresh from the frame after it


@dataclass
class Reading:
    """One model on one frame."""
    backend: Backend
    probs: np.ndarray        # (classes,) softmax
    latency_ms: float

    def top(self, k: int = TOP_K) -> dict[str, float]:
        """The k likeliest classes, name -> probability; a name the model gives two classes (ImageNet's "crane",
        the bird and the machine) carries each one's index, "crane (class 134)", so that they stay apart."""
        names = class_names(self.backend.config.classes, len(self.probs))
        return {names[i]: float(self.probs[i]) for i in np.argsort(-self.probs)[:k]}


class Meter:
    """Latencies of one model over the last WINDOW frames."""

    def __init__(self):
        self.ms: deque[float] = deque(maxlen=WINDOW)

    def add(self, ms: float) -> None:
        self.ms.append(ms)

    @property
    def last(self) -> float | None:
        return self.ms[-1] if self.ms else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.ms) if self.ms else None


@dataclass
class LiveStats:
    """One browser session's windows; reset when the quantized variant changes."""
    variant: str | None = None
    fp: Meter = field(default_factory=Meter)
    quant: Meter = field(default_factory=Meter)
    stamps: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    frames: int = 0
    views: str | None = None  # the session's folder of live views: a random name, given on its first frame

    def reset(self, variant: str) -> None:
        self.variant, self.fp, self.quant, self.stamps = variant, Meter(), Meter(), deque(maxlen=WINDOW)

    def tick(self) -> None:
        now = time.perf_counter()
        if len(self.stamps) > 1 and now - self.stamps[-1] > max(1.0, PAUSED * statistics.median(np.diff(self.stamps))):
            self.stamps.clear()  # (else the pause would count in the rate for the next WINDOW frames)
        self.stamps.append(now)
        self.frames += 1

    @property
    def fps(self) -> float | None:
        """Frames processed per second over the window (both models on each), since the last pause (`PAUSED`)."""
        if len(self.stamps) < 2 or self.stamps[-1] == self.stamps[0]:
            return None
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


class Comparison:
    """The full-precision model against one of several quantized variants."""

    def __init__(self, fp: Backend, variants: dict[str, Callable[[], Backend]], default: str | None = None):
        if not variants:
            raise ValueError("no quantized variant to compare against")
        self.fp = fp
        self.openers = dict(variants)
        self.default = default if default is not None else next(iter(self.openers))
        if self.default not in self.openers:
            raise ValueError(f"unknown variant {self.default!r}; known: {', '.join(self.openers)}")
        self._open: dict[str, Backend] = {}
        self._failed: dict[str, tuple[tuple | None, Exception]] = {}  # label -> (its file's stamp, the error)
        self._lock = threading.Lock()
        _warm(fp)

    @property
    def size(self) -> int:
        return self.fp.config.img_size

    def variant(self, label: str | None) -> Backend:
        """The quantized backend of a variant label (opened, checked against the FP model and warmed once).

        One that fails to open raises the same error again, without being opened again (on every frame, holding
        the lock every visitor's new variant waits on), until the file its opener names changes (`_file_stamp`)."""
        label = label or self.default
        if not isinstance(label, str) or label not in self.openers:
            raise ValueError(f"unknown quantized variant {label!r}")
        opened = self._open.get(label)
        if opened is not None:  # not waiting on the lock while another visitor's variant is built (minutes)
            return opened
        self._raise_failure(label)
        with self._lock:
            if label not in self._open:
                self._raise_failure(label)  # (failed while this call waited)
                stamp = _file_stamp(self.openers[label])
                try:
                    backend = self.openers[label]()
                    a, b = self.fp.config, backend.config
                    if (a.img_size, a.classes, a.num_classes) != (b.img_size, b.classes, b.num_classes):
                        raise ValueError(f"{backend.name} takes {b.img_size}x{b.img_size} images and classes "
                                         f"{list(b.classes)}; the full-precision model takes {a.img_size}x"
                                         f"{a.img_size} and {list(a.classes)}: they cannot be compared")
                    _warm(backend)
                except (ValueError, OSError) as e:
                    # a copy, raised never: the error's traceback, which grows as it is raised, would hold the
                    # frames it passes through, and the visitor's state in them (their live views never removed)
                    self._failed[label] = (stamp, copy.copy(e))
                    raise
                self._open[label] = backend
            return self._open[label]

    def _raise_failure(self, label: str) -> None:
        """The error a variant failed to open with, raised again while its file is as it was then."""
        failed = self._failed.get(label)
        if failed is not None and failed[0] == _file_stamp(self.openers[label]):
            raise copy.copy(failed[1])  # (not the kept one: see `variant`)

    def run(self, rgb: np.ndarray, label: str | None, mirrored: bool = False, frame_index: int = 0,
            repeats: int = 1) -> tuple[np.ndarray, Reading, Reading]:
        """(model view (S, S, 3), FP reading, quantized reading) of one uint8 RGB frame.

        The models take turns to run first (the FP model on even `frame_index`); `repeats` > 1 times each
        model that many times and reports the median (for still images)."""
        quant = self.variant(label)
        view = model_view(rgb, self.size, mirrored)
        readings = {}
        for backend in ((self.fp, quant) if frame_index % 2 == 0 else (quant, self.fp)):
            x = to_model_array(view[None], backend.config.mean, backend.config.std)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                logits = backend(x)
                times.append((time.perf_counter() - t) * 1e3)
            if not np.isfinite(logits).all():
                raise ValueError(f"{backend.name} gave NaN or infinite scores for this image")
            readings[id(backend)] = Reading(backend, _softmax(logits[0]), statistics.median(times))
        return view, readings[id(self.fp)], readings[id(quant)]


def file_stamp(path: str | os.PathLike) -> tuple | None:
    """A file as it is now, to tell when it changes: (modification time, size), or None where it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _file_stamp(opener) -> tuple | None:
    """`file_stamp` of the model file an opener opens, for openers of a file's path as `app.main` makes them (a
    functools.partial whose first argument is the path); None for another opener."""
    args = getattr(opener, "args", ())
    if not args or not isinstance(args[0], (str, os.PathLike)):
        return None
    return file_stamp(args[0])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max()
    e = np.exp(z)
    return e / e.sum()


def _warm(backend: Backend) -> None:
    """One throw-away call, so the first frame is not timed with lazy initialisation in it; a model that gives
    other than one score per class of its config (an ONNX graph whose output width is left open) is refused."""
    s, n = backend.config.img_size, backend.config.num_classes
    shape = np.shape(backend(np.zeros((1, 3, s, s), np.float32)))
    if shape != (1, n):
        raise ValueError(f"{backend.name} gives scores of shape {shape} for one image, not (1, {n}) for its "
                         f"{n} classes")
