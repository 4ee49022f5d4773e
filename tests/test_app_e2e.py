"""The app end to end: `python app/main.py` started as a script, answering an upload through
gradio_client, and streaming a fake webcam in real headless Chromium (both models' labels and latencies
must update). The Chromium test needs Debian's `chromium` and `pip install playwright` (no
`playwright install`); README's test command installs both."""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

import quant
from app.examples import DRAWINGS, SIZE
from quant.models import save_model

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, ortops_cache):
    """The app on a tiny FP model and its ternary packed copy, as `python app/main.py` on a free port."""
    import torch

    from conftest import TINY
    from quant.models import VisionTransformer
    tmp = tmp_path_factory.mktemp("app")
    assets = tmp / "assets"
    assets.mkdir()
    torch.manual_seed(0)
    save_model(VisionTransformer(TINY).eval(), assets / "tiny_fp.safetensors")
    q = quant.quantize(quant.load_any(assets / "tiny_fp.safetensors"), quant.recipe("w8a8", weight_format="ternary"))
    quant.save_quantized(q, assets / "tiny_ternary.safetensors")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "BITVIT_CACHE": str(tmp / "cache"), "BITVIT_ORTOPS_CACHE": str(ortops_cache),
           "GRADIO_TEMP_DIR": str(tmp / "gradio")}  # the uploads it is sent, not into the machine's /tmp/gradio
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app" / "main.py"), "--host", "127.0.0.1",
                             "--port", str(port), "--fp", str(assets / "tiny_fp.safetensors"), "--assets", str(assets)],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, tmp
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine: the server is not left running
        proc.kill()
        proc.wait()
    log.close()


def test_the_app_answers_an_upload_through_gradio_client(server, tmp_path):
    from gradio_client import Client, handle_file
    url, _ = server
    DRAWINGS["ship"]().resize((SIZE, SIZE)).save(tmp_path / "ship.png")
    client = Client(url, verbose=False, download_files=tmp_path)
    view, fp_top, fp_card, q_top, q_card, summary = client.predict(handle_file(str(tmp_path / "ship.png")),
                                                                   api_name="/classify")
    assert Path(view).is_file()
    assert len(fp_top["confidences"]) == 3 and len(q_top["confidences"]) == 3
    assert "tiny_fp.safetensors" in fp_card and "ternary" in q_card and "ms" in q_card
    assert "smaller on disk" in summary


def test_a_bad_upload_gets_a_message_and_the_app_keeps_serving(server, tmp_path):
    from gradio_client import Client, handle_file
    url, _ = server
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    client = Client(url, verbose=False, download_files=tmp_path)
    *_, summary = client.predict(handle_file(str(tmp_path / "bad.png")), api_name="/classify")
    assert summary.startswith("⚠")
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "ok.png")
    *_, summary = client.predict(handle_file(str(tmp_path / "ok.png")), api_name="/classify")
    assert "smaller on disk" in summary


def write_y4m(path: Path, frames: int = 30, w: int = 320, h: int = 240) -> Path:
    """A short video for Chromium's fake webcam: a drawn airplane sliding across under a band that is
    red on the left and blue on the right (to see which way round the models get it), as I420 y4m."""
    plane = np.asarray(DRAWINGS["airplane"]().resize((h, h)).convert("RGB"))
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            rgb = np.full((h, w, 3), 90, np.uint8)
            x = (i * 4) % (w - h)
            rgb[:, x:x + h] = plane
            rgb[:h // 4, :w // 2], rgb[:h // 4, w // 2:] = (255, 0, 0), (0, 0, 255)
            f.write(b"FRAME\n" + _i420(rgb))
    return path


def _i420(rgb: np.ndarray) -> bytes:
    """uint8 RGB (H, W, 3) -> full-range BT.601 Y plane, then U and V at half resolution (JPEG's YCbCr)."""
    r, g, b = np.moveaxis(rgb.astype(np.float32), -1, 0)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u, v = 128 + 0.564 * (b - y), 128 + 0.713 * (r - y)
    half = lambda c: c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2).mean((1, 3))  # noqa: E731
    return b"".join(np.clip(p + 0.5, 0, 255).astype(np.uint8).tobytes() for p in (y, half(u), half(v)))


def _texts(page, selector: str) -> str:
    return page.locator(selector).inner_text(timeout=5000)


def _live_view(page, url: str, error: type) -> np.ndarray:
    """The live view's current image. The stream keeps replacing it, so a fetch can be cut off, or find
    the file gone (a body that is no image), as the page moves on to the next frame: try the latest one again."""
    for attempt in range(5):
        src = page.locator("#live-view img").get_attribute("src")
        try:
            return np.asarray(Image.open(io.BytesIO(page.request.get(urljoin(url, src)).body())).convert("RGB"))
        except (error, UnidentifiedImageError):
            if attempt == 4:
                raise
            time.sleep(0.5)


def test_the_webcam_stream_updates_both_models_in_headless_chromium(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium executable (README's test command installs Debian's chromium)")
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                                             "(pip install -r requirements-dev.txt)")
    url, _ = server
    video = write_y4m(tmp_path / "webcam.y4m")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--use-fake-device-for-media-stream",
             "--use-fake-ui-for-media-stream", f"--use-file-for-fake-video-capture={video}"]
    with sync.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, permissions=["camera"], args=flags,
                                                   viewport={"width": 1280, "height": 1100})
        try:
            page = ctx.new_page()
            page.goto(url, wait_until="load", timeout=60_000)
            page.get_by_text("Click to Access Webcam").click(timeout=30_000)
            page.locator("#webcam button", has_text="Record").click(timeout=30_000)
            seen = []
            deadline = time.time() + 90
            while time.time() < deadline and len(set(seen)) < 3:
                stats = _texts(page, "#live-fp-stats") + _texts(page, "#live-q-stats")
                if stats.count(" ms") >= 4:
                    seen.append(stats)
                time.sleep(0.5)
            page.screenshot(path=str(tmp_path / "live.png"), full_page=True)
            if os.environ.get("BITVIT_SCREENSHOT"):
                shutil.copy(tmp_path / "live.png", os.environ["BITVIT_SCREENSHOT"])
            assert len(set(seen)) >= 3, f"latencies did not update (saw {seen[-1:] or 'none'})"
            view = _live_view(page, url, sync.Error)
            band = view[: view.shape[0] // 5].astype(int)
            left, right = band[:, : view.shape[1] // 3].mean((0, 1)), band[:, -view.shape[1] // 3:].mean((0, 1))
            assert left[0] > left[2] + 100 and right[2] > right[0] + 100, "the models see the webcam mirrored"
            fp_label, q_label = _texts(page, "#live-fp-label"), _texts(page, "#live-q-label")
            assert "%" in fp_label and "%" in q_label
            assert "frames/s" in _texts(page, "#live-summary")
        finally:
            ctx.close()
