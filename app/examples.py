"""Example pictures for the Image tab, drawn with PIL when the app starts (no data set needed).

Simple scenes of five CIFAR-10 classes (airplane, automobile, frog, ship, truck): shapes on
gradient backgrounds, drawn at 4x and downsampled for smooth edges. They are drawings, not CIFAR
images, so what the models make of them is a fair, if hard, test of generalisation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 192
_S = 4 * SIZE  # drawing canvas


def _gradient(top: tuple, bottom: tuple) -> Image.Image:
    t = np.linspace(0, 1, _S)[:, None, None]
    rows = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(rows, _S, axis=1).astype(np.uint8))


def _p(*xy: float) -> list[tuple[float, float]]:
    """Points given in 0..1 canvas units."""
    return [(xy[i] * _S, xy[i + 1] * _S) for i in range(0, len(xy), 2)]


def _box(x0, y0, x1, y1) -> list[float]:
    return [x0 * _S, y0 * _S, x1 * _S, y1 * _S]


def airplane() -> Image.Image:
    img = _gradient((70, 130, 210), (175, 210, 240))
    d = ImageDraw.Draw(img)
    grey, dark = (215, 218, 225), (120, 125, 135)
    d.polygon(_p(0.42, 0.50, 0.18, 0.78, 0.27, 0.80, 0.58, 0.52), fill=dark)       # far wing
    d.ellipse(_box(0.10, 0.42, 0.90, 0.56), fill=grey)                              # fuselage
    d.polygon(_p(0.45, 0.49, 0.22, 0.20, 0.31, 0.18, 0.60, 0.48), fill=grey)       # near wing
    d.polygon(_p(0.12, 0.48, 0.06, 0.26, 0.13, 0.26, 0.24, 0.46), fill=grey)       # tail fin
    for x in np.arange(0.58, 0.82, 0.045):
        d.ellipse(_box(x, 0.46, x + 0.022, 0.48), fill=(60, 70, 90))                # windows
    return img


def automobile() -> Image.Image:
    img = _gradient((150, 185, 215), (205, 215, 220))
    d = ImageDraw.Draw(img)
    d.rectangle(_box(0, 0.70, 1, 1), fill=(80, 80, 85))                             # road
    red = (200, 30, 35)
    d.rounded_rectangle(_box(0.08, 0.48, 0.92, 0.72), radius=0.06 * _S, fill=red)  # body
    d.polygon(_p(0.25, 0.49, 0.35, 0.32, 0.68, 0.32, 0.78, 0.49), fill=red)        # cabin
    d.polygon(_p(0.30, 0.48, 0.38, 0.36, 0.50, 0.36, 0.50, 0.48), fill=(170, 210, 235))
    d.polygon(_p(0.53, 0.48, 0.53, 0.36, 0.66, 0.36, 0.73, 0.48), fill=(170, 210, 235))
    for x in (0.26, 0.74):
        d.ellipse(_box(x - 0.09, 0.62, x + 0.09, 0.80), fill=(25, 25, 25))
        d.ellipse(_box(x - 0.04, 0.67, x + 0.04, 0.75), fill=(170, 170, 175))
    d.ellipse(_box(0.86, 0.53, 0.91, 0.58), fill=(250, 235, 150))                   # headlight
    return img


def frog() -> Image.Image:
    img = _gradient((90, 110, 60), (60, 80, 40))
    d = ImageDraw.Draw(img)
    green, light = (70, 150, 50), (150, 200, 90)
    d.ellipse(_box(0.12, 0.62, 0.40, 0.86), fill=green)                             # back legs
    d.ellipse(_box(0.60, 0.62, 0.88, 0.86), fill=green)
    d.ellipse(_box(0.20, 0.38, 0.80, 0.82), fill=green)                             # body
    d.ellipse(_box(0.32, 0.56, 0.68, 0.80), fill=light)                             # belly
    for x in (0.33, 0.67):
        d.ellipse(_box(x - 0.09, 0.28, x + 0.09, 0.46), fill=green)                 # eye bumps
        d.ellipse(_box(x - 0.055, 0.32, x + 0.055, 0.43), fill=(230, 200, 40))
        d.ellipse(_box(x - 0.02, 0.345, x + 0.02, 0.41), fill=(10, 10, 10))
    d.arc(_box(0.36, 0.44, 0.64, 0.58), 20, 160, fill=(30, 60, 20), width=6)        # mouth
    return img


def ship() -> Image.Image:
    img = _gradient((120, 165, 215), (200, 220, 235))
    d = ImageDraw.Draw(img)
    d.rectangle(_box(0, 0.64, 1, 1), fill=(30, 80, 140))                            # sea
    d.polygon(_p(0.06, 0.52, 0.94, 0.52, 0.84, 0.70, 0.14, 0.70), fill=(40, 40, 50))  # hull
    d.rectangle(_box(0.06, 0.52, 0.94, 0.56), fill=(170, 40, 40))
    d.rectangle(_box(0.30, 0.40, 0.70, 0.52), fill=(235, 235, 235))                 # superstructure
    d.rectangle(_box(0.40, 0.30, 0.60, 0.40), fill=(235, 235, 235))
    d.rectangle(_box(0.46, 0.20, 0.52, 0.30), fill=(200, 60, 40))                   # funnel
    for x in np.arange(0.33, 0.68, 0.05):
        d.rectangle(_box(x, 0.44, x + 0.025, 0.47), fill=(50, 70, 100))
    return img


def truck() -> Image.Image:
    img = _gradient((160, 190, 215), (215, 220, 215))
    d = ImageDraw.Draw(img)
    d.rectangle(_box(0, 0.72, 1, 1), fill=(95, 95, 90))                             # road
    d.rectangle(_box(0.04, 0.28, 0.64, 0.70), fill=(235, 235, 230))                 # box trailer
    d.rectangle(_box(0.04, 0.28, 0.64, 0.33), fill=(40, 90, 160))
    d.polygon(_p(0.66, 0.70, 0.66, 0.36, 0.84, 0.36, 0.95, 0.52, 0.95, 0.70), fill=(40, 90, 160))  # cab
    d.polygon(_p(0.70, 0.50, 0.70, 0.40, 0.82, 0.40, 0.90, 0.50), fill=(170, 210, 235))
    for x in (0.16, 0.30, 0.82):
        d.ellipse(_box(x - 0.075, 0.64, x + 0.075, 0.79), fill=(25, 25, 25))
        d.ellipse(_box(x - 0.03, 0.685, x + 0.03, 0.745), fill=(160, 160, 160))
    return img


DRAWINGS = {"airplane": airplane, "automobile": automobile, "frog": frog, "ship": ship, "truck": truck}


def write_examples(folder: str | Path) -> list[Path]:
    """Draw every example as `<folder>/<class>.png` (SIZE x SIZE) and return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in DRAWINGS.items():
        path = folder / f"{name}.png"
        draw().resize((SIZE, SIZE), Image.LANCZOS).save(path)
        paths.append(path)
    return paths
