"""Shared fixtures: tiny models and synthetic data sets, written fresh into temporary folders."""
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach for the network

from quant.models import ViTConfig, VisionTransformer, save_model  # noqa: E402

TINY = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 stem_channels=(8,), num_classes=3, classes=("cat", "dog", "frog"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test decodes into its own cache folder."""
    monkeypatch.setenv("BITVIT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _gradio_files_kept(tmp_path_factory, monkeypatch):
    """The files Gradio caches for a page (its example images, uploads, outputs) go to a folder of the test's own,
    not into the machine's shared <temp>/gradio (another user's there is a folder this one cannot write)."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))


@pytest.fixture(autouse=True)
def _threads_kept():
    """A command run in a test sets torch's thread count (--threads, export.bench's 2): later tests keep the
    count they started with."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _figures_closed():
    """Figures a test draws are closed after it (the functions that draw hand them to their caller to close, as
    Gradio's Plot does)."""
    yield
    if "matplotlib.pyplot" in sys.modules:  # (imported by whatever drew them)
        sys.modules["matplotlib.pyplot"].close("all")


@pytest.fixture
def savefig_killed_midway(monkeypatch):
    """Figure.savefig writes half a file where it was told to, then the run is interrupted."""
    from matplotlib.figure import Figure

    def half(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Figure, "savefig", half)


@pytest.fixture
def tiny_model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(TINY).eval()


@pytest.fixture
def fp_file(tmp_path, tiny_model) -> Path:
    """`tiny_model` saved as a full-precision bitvit file, `fp.safetensors`."""
    save_model(tiny_model, tmp_path / "fp.safetensors")
    return tmp_path / "fp.safetensors"


@pytest.fixture
def checkpoint(tmp_path, tiny_model) -> Path:
    """`tiny_model` saved as `tiny.safetensors` (results name a model by its file's stem)."""
    save_model(tiny_model, tmp_path / "tiny.safetensors")
    return tmp_path / "tiny.safetensors"


def synthetic_images(n: int, size: int, label: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 images whose colour says their class, plus noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros(3)
    base[label % 3] = 200
    return np.clip(base + rng.normal(0, 30, (n, size, size, 3)), 0, 255).astype(np.uint8)


def write_tree(root: Path, splits=("train", "test"), classes=TINY.classes, per_class=6, size=16) -> Path:
    """An image-folder tree `root/<split>/<class>/NNNN.jpg` of synthetic images."""
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i, img in enumerate(synthetic_images(per_class, size, c, seed=10 * s + c)):
                Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=95)
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return write_tree(tmp_path / "tree")


def write_tar(tree: Path, path: Path, splits=("train", "test")) -> Path:
    """`tree`'s split folders in a .tar.gz, as the JPEG copy ships (links stored as links)."""
    with tarfile.open(path, "w:gz") as tar:
        for split in splits:
            tar.add(tree / split, arcname=split)
    return path


@pytest.fixture
def image_tar(tmp_path, image_tree) -> Path:
    return write_tar(image_tree, tmp_path / "data.tar.gz")


@pytest.fixture
def no_decoding(monkeypatch):
    """An image decoded (or resized) fails the test: for what must be refused before minutes of decoding."""
    def decoded(*args):
        raise AssertionError("an image was decoded")
    monkeypatch.setattr("quant.data._resize", decoded)


@pytest.fixture
def cifar_batches(tmp_path) -> Path:
    """A folder in torchvision's cifar-10-batches-py format (python-2 style byte-keyed pickles)."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        labels = [int(x) for x in rng.integers(0, 10, 20)]
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * 20}, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def ortops_cache(tmp_path_factory) -> Path:
    """An empty cache for bitvit's ONNX Runtime op library: export tests build it from scratch once."""
    return tmp_path_factory.mktemp("ortops")


@pytest.fixture
def shared_ortops_cache(ortops_cache, monkeypatch) -> Path:
    """$BITVIT_ORTOPS_CACHE set to the session's `ortops_cache`, so the export tests share one build."""
    monkeypatch.setenv("BITVIT_ORTOPS_CACHE", str(ortops_cache))
    return ortops_cache
