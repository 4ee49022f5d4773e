"""Run an exported bitvit ONNX file: `export.runtime.load(path)` -> a `Session` ready for images.

The session registers bitvit's custom-op library (building it on first use) only when the file uses
the `bitvit` domain, turns ONNX Runtime's spinning worker threads off unless asked to keep them (they
slow a torch model in the same process about 3x), and knows the preprocessing the model expects from
the file's metadata: image size, mean/std and class names.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import Message
from onnx import numpy_helper

from quant.cli import is_positive_int, max_threads
from quant.data import check_model_input, to_model_array
from quant.models import ViTConfig, existing_file, fp_parameters, refuse_newer

from .exporter import META_FORMAT
from .ortops import DOMAIN, DOMAIN_VERSION, library_path

MAX_ONNX_BYTES = 2 ** 31  # protobuf's limit on one message: no ONNX model file is larger


def read_onnx(path: Path) -> onnx.ModelProto:
    """The ONNX model in file `path`, after a size check (a 2 GiB sparse file would otherwise be read whole
    before protobuf refused it). bitvit's exports hold all their weights, so one keeping tensors in
    external files is refused rather than followed."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty, not an ONNX model")
    if size > MAX_ONNX_BYTES:
        raise ValueError(f"{path} is {size / 2 ** 30:.1f} GiB, over the 2 GiB an ONNX model file can hold")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError for garbage
        raise ValueError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    external = _external_tensor(proto, "model")
    if external is not None:  # ONNX Runtime would read it from the working folder, a Constant's as an initializer's
        raise ValueError(f"{path} keeps tensors in external files (its {external}'s data); a bitvit export holds all "
                         f"of its weights")
    bad = _non_utf8_text(proto, "model")
    if bad is not None:  # ONNX Runtime's error naming it would fail to decode ("'utf-8' codec can't decode")
        raise ValueError(f"{path} is damaged: its {bad[0]} holds {bad[1]!r}, which is not UTF-8 text")
    return proto


def _external_tensor(msg: Message, where: str) -> str | None:
    """The field path of the first tensor anywhere in `msg` (an initializer, a sparse one's values, a node's
    attribute, in a subgraph or a function) whose data lies in another file, or None."""
    if isinstance(msg, onnx.TensorProto) and msg.data_location == onnx.TensorProto.EXTERNAL:
        return where
    for field, value in msg.ListFields():
        if field.type == field.TYPE_MESSAGE:
            for i, sub in enumerate((value,) if isinstance(value, Message) else value):
                found = _external_tensor(sub, f"{where}.{field.name}"
                                         + ("" if isinstance(value, Message) else f"[{i}]"))
                if found is not None:
                    return found
    return None


def _non_utf8_text(msg: Message, where: str) -> tuple[str, bytes] | None:
    """(field path, value) of the first string field of `msg` that is not valid UTF-8 (protobuf hands
    such a proto2 string over as bytes), or None."""
    for field, value in msg.ListFields():
        if field.type == field.TYPE_STRING:
            for v in (value,) if isinstance(value, (str, bytes)) else value:
                if isinstance(v, bytes):
                    return f"{where}.{field.name}", v
        elif field.type == field.TYPE_MESSAGE:
            for i, sub in enumerate((value,) if isinstance(value, Message) else value):
                found = _non_utf8_text(sub, f"{where}.{field.name}" + ("" if isinstance(value, Message) else f"[{i}]"))
                if found is not None:
                    return found
    return None


def bitvit_metadata(proto: onnx.ModelProto, path: Path) -> dict[str, str]:
    """The metadata of a bitvit export (written by this bitvit's version of the format), else one error."""
    meta = {p.key: p.value for p in proto.metadata_props}
    refuse_newer(meta.get("format"), META_FORMAT, path)
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path} is not a bitvit ONNX export (no {META_FORMAT!r} metadata); "
                         f"write one with python -m export")
    return meta


def ort_message(e: Exception) -> str:
    """ONNX Runtime's error as one line, without the C++ source location and signature it prefixes
    (`/onnxruntime_src/...cc:256 onnxruntime::Model::Model(...) `, the signature maybe after a return type
    `void `), or the bare location and function name (`tensorprotoutils.cc:1534 ValidateEmbedded... `, or a
    lambda's `matmul_nbits.cc:316 operator() `). Cut short past 1000 characters: ONNX Runtime quotes the node, whose
    name a file may make megabytes long."""
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (?:[^(]*? )?[^(\s]+\([^)]*\)\s*", "", str(e))
    text = re.sub(r"\b\w+\.(?:cc|h):\d+ \w+(?:\(\))?\s+", "", text)
    text = " ".join(text.split()).rstrip(",")
    return text if len(text) <= 1000 else text[:1000] + " ..."


def register_library(so: ort.SessionOptions, library: Path | None = None) -> None:
    """Registers bitvit's op library (`library`, else `library_path()`'s, built on first use) with `so`; one
    ValueError where it will not build or ONNX Runtime will not load it."""
    lib = library or library_path()
    try:
        so.register_custom_ops_library(str(lib))
    except Exception as e:  # ORT's own Fail/InvalidArgument are not RuntimeErrors
        raise ValueError(f"ONNX Runtime cannot load bitvit's op library {lib}: {ort_message(e)}") from None


class Session:
    """An ONNX Runtime session of a bitvit ViT plus the preprocessing it expects."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spinning: bool = False,
                 library: Path | None = None):
        path = existing_file(path, "ONNX")
        if isinstance(threads, np.integer):  # a count computed with numpy
            threads = int(threads)
        if threads is not None and not (is_positive_int(threads) and threads <= max_threads()):
            raise ValueError(f"threads must be an integer in 1..{max_threads()} (this machine's cores), "
                             f"got {threads!r}")
        if not isinstance(spinning, (bool, np.bool_)):  # "no" or "false" would turn spinning on
            raise ValueError(f"spinning must be True or False, got {spinning!r}")
        proto = read_onnx(path)
        meta = bitvit_metadata(proto, path)
        self.path = path
        try:
            self.config = ViTConfig.from_json(meta["bitvit.config"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path} has no readable bitvit.config metadata ({type(e).__name__}: {e})") from None
        self.format = meta.get("bitvit.format", "")
        # exports before 2026-12-06 do not record it: the full-precision architecture's count then
        count = meta.get("bitvit.parameters") or str(fp_parameters(self.config))
        # int() takes "-5", " 7 " and "1_000", and refuses more than 4300 digits with its own message
        if not (count.isascii() and count.isdigit() and len(count) <= 18 and int(count) > 0):
            raise ValueError(f"{path}'s bitvit.parameters metadata is not a count: {count!r}")
        self.weight_count = int(count)
        self.uses_custom_ops = any(op.domain == DOMAIN for op in proto.opset_import)
        for op in proto.opset_import:  # ONNX Runtime would run another version's nodes as version 1's
            if op.domain == DOMAIN and op.version != DOMAIN_VERSION:
                raise ValueError(f"{path} imports version {op.version} of bitvit's ops; this bitvit's op library "
                                 f"implements version {DOMAIN_VERSION}")
        so = ort.SessionOptions()
        so.log_severity_level = 4  # its errors reach the caller as one ValueError, not also as a log line
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        for pool in ("intra_op", "inter_op"):
            so.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spinning else "0")
        if self.uses_custom_ops:
            register_library(so, library)
        try:
            # enable_fallback=0: its retry on the CPU (where it already is) first prints an "EP Error" banner
            self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                                enable_fallback=0)
        except Exception as e:  # ORT's errors for invalid graphs, bad initializers, unknown ops
            raise ValueError(f"ONNX Runtime cannot load {path}: {ort_message(e)}") from None
        self._check_signature()
        self._check_architecture(proto)

    def _check_signature(self) -> None:
        """One float32 input `image` (B, 3, S, S) and one output `logits` (B, classes), as the metadata says."""
        s, n = self.config.img_size, self.config.num_classes
        want = {"image": [3, s, s], "logits": [n]}
        got = {a.name: a.shape[1:] for a in self.session.get_inputs() + self.session.get_outputs()}
        if set(got) != set(want) or any(
                len(got[k]) != len(v) or any(isinstance(g, int) and g != w for g, w in zip(got[k], v))
                for k, v in want.items()):
            raise ValueError(f"{self.path}'s graph does not match its bitvit metadata: expected input image "
                             f"(B, 3, {s}, {s}) and output logits (B, {n}), got "
                             + ", ".join(f"{k} {tuple(v)}" for k, v in got.items()))
        kind = next(a.type for a in self.session.get_inputs())  # "tensor(float16)": refused at the first call
        if kind != "tensor(float)":
            raise ValueError(f"{self.path}'s graph takes {kind[7:-1]} images; bitvit feeds float32 ones (export "
                             f"it with a float32 input)")

    def _check_architecture(self, proto) -> None:
        """The graph's weights have the metadata's width and depth (what the app counts parameters from) and
        number of classes (what it names predictions from), and finite values."""
        cfg = self.config
        dims = {t.name: list(t.dims) for t in proto.graph.initializer}
        depth = len({name.split(".")[1] for name in dims if name.startswith("blocks.")})
        pos = dims.get("pos_embed", dims.get("pos_embed_fp16"))  # fp16 exports store it half and cast it
        want = [1, cfg.num_patches + 1, cfg.embed_dim]
        if pos != want or depth != cfg.depth:
            raise ValueError(f"{self.path}'s graph does not match its bitvit metadata: pos_embed {pos} and "
                             f"{depth} blocks, the metadata says {want} and {cfg.depth}")
        get = lambda name: dims.get(name, dims.get(name + "_fp16"))  # noqa: E731
        shapes = {  # what else the parameter count (bits per weight in the app) is made of: stem and MLP widths,
            # and the classes the head scores (a graph output's declared width is believed past bitvit's op)
            "patch_embed.proj.weight": (get("patch_embed.proj.weight"),
                                        [cfg.embed_dim, (cfg.stem_channels or (3,))[-1], cfg.patch_size, cfg.patch_size]),
            "blocks.0.mlp.fc1.bias": (get("blocks.0.mlp.fc1.bias"), [int(cfg.embed_dim * cfg.mlp_ratio)]),
            "head.bias": (get("head.bias"), [cfg.num_classes])}
        for what, (found, meta_says) in shapes.items():
            if found is not None and found != meta_says:  # absent: renamed by a tool (ORT's quantize_dynamic)
                raise ValueError(f"{self.path}'s graph does not match its bitvit metadata: {what} {found}, the "
                                 f"metadata says {meta_says}")
        heads = {a.i for n in proto.graph.node if n.op_type == "MultiHeadAttention" for a in n.attribute
                 if a.name == "num_heads"}
        if heads - {cfg.num_heads}:  # another divisor of the width would run, splitting the heads otherwise
            raise ValueError(f"{self.path}'s graph does not match its bitvit metadata: attention with "
                             f"{sorted(heads - {cfg.num_heads})} heads, the metadata says {cfg.num_heads}")
        T = onnx.TensorProto
        floats = (T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE)
        constants = [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        for t in [*proto.graph.initializer, *constants]:  # a damaged weight or scale turns every output into NaN
            if t.data_type not in floats:
                continue
            try:
                values = numpy_helper.to_array(t)
            except ValueError as e:  # data of another size than its dims, in one ONNX Runtime left unread (unused)
                raise ValueError(f"{self.path}: weight {t.name!r} is damaged ({e})") from None
            if not np.isfinite(values.astype(np.float32)).all():
                raise ValueError(f"{self.path}: weight {t.name!r} holds NaN or infinite values (a damaged file?)")

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    @property
    def image_size(self) -> int:
        return self.config.img_size

    def preprocess(self, images) -> np.ndarray:
        """uint8 RGB images (H, W, 3) or (B, H, W, 3), or a list of images of any sizes -> normalised float32
        (B, 3, S, S).

        Other sizes are resized the way the data was (shorter side to S, bicubic, centre crop)."""
        from PIL import Image

        from quant.data import _resize
        try:
            arr = np.asarray(images)
        except ValueError:  # a list of images of different sizes
            arr = None
        if arr is None or arr.dtype == object:
            if not isinstance(images, (list, tuple)) or not images:
                raise ValueError(f"expected uint8 RGB images (H, W, 3) or (B, H, W, 3), got {type(images).__name__}")
            return np.concatenate([self.preprocess(image) for image in images])  # each resized on its own
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB images (H, W, 3) or (B, H, W, 3), got {arr.dtype} {arr.shape}")
        if 0 in arr.shape:
            raise ValueError(f"expected at least one image of at least 1x1 pixels, got {arr.shape}")
        s = self.image_size
        if arr.shape[1:3] != (s, s):
            arr = np.stack([_resize(Image.fromarray(a), s) for a in arr])
        return to_model_array(arr, self.config.mean, self.config.std)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (B, classes) of normalised images (B, 3, S, S)."""
        x = check_model_input(x, self.image_size)
        try:
            logits = self.session.run(["logits"], {"image": x})[0]
        except Exception as e:  # ORT's Fail/InvalidArgument, e.g. a packed initializer of the wrong size
            raise ValueError(f"ONNX Runtime could not run {self.path}: {ort_message(e)}") from None
        if not np.isfinite(logits).all():  # finite inputs (checked above) but, say, a scale of 1e30
            raise ValueError(f"{self.path} gives NaN or infinite logits for finite images (a damaged file?)")
        return logits

    def predict(self, images) -> np.ndarray:
        """Logits of uint8 RGB images (see `preprocess`)."""
        return self(self.preprocess(images))


def load(path: str | os.PathLike, threads: int | None = None, spinning: bool = False,
         library: Path | None = None) -> Session:
    """Open a bitvit ONNX file for inference on the CPU (`threads`: intra-op threads, default all cores;
    `spinning`: worker threads spin-wait between calls, ONNX Runtime's own default, instead of sleeping;
    `library`: bitvit's op library where the caller has looked it up already, else `library_path()`'s)."""
    return Session(path, threads, spinning, library)
