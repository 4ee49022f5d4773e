"""bitvit's ONNX Runtime ops: built from source, equal to a numpy reference, refusing bad input cleanly."""
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import quant.cli
from export import exporter, ortops
from quant.pack import pack_codes
from quant.quantizers import WEIGHT_FORMATS

OPS = {op: fmt for fmt, op in exporter.OPS.items()}  # every op the exporter writes -> its weight format
BIG = (4, 150, 130, 70)  # large enough (600 tokens, 5.5M multiply-adds) for the op to use the thread pool


pytestmark = pytest.mark.usefixtures("shared_ortops_cache")


def layer_norm(x, norm, eps):
    """LayerNorm over the last axis in float64, rounded to float32 as the op keeps it."""
    x64 = x.astype(np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps) * norm[0] + norm[1]).astype(np.float32)


def gelu(y):
    """Exact GELU in float64."""
    y = np.asarray(y, np.float64)
    return 0.5 * y * (1 + torch.erf(torch.from_numpy(y) / np.sqrt(2)).numpy())


def weights(codes, fmt):
    """The integer weights (N, K) the codes of weight format `fmt` stand for, float64."""
    c = codes.astype(np.float64)
    return {"ternary": c - 1, "binary": c * 2 - 1, "int4": c - 8, "int8": c - 128}[fmt]


def reference(x, codes, scales, bias, fmt, norm=None, eps=1e-5, norm2=None, eps2=1e-5, act="none"):
    """The contract's int8-per-token linear, in float64 numpy: torch.round is round-half-to-even.
    `norm` = (weight, bias) of the input LayerNorm applied first, `norm2` of a second one after it."""
    w = weights(codes, fmt)
    x2 = x.reshape(-1, x.shape[-1])
    if norm is not None:
        x2 = layer_norm(x2, norm, eps)
    if norm2 is not None:
        x2 = layer_norm(x2, norm2, eps2)
    s = np.abs(x2).max(-1, keepdims=True).astype(np.float32) / np.float32(127)
    q = np.clip(np.round(x2 / np.where(s > 0, s, 1)), -127, 127)
    y = (q @ w.T) * s * scales[None] + (0 if bias is None else bias[None])
    if act == "gelu":
        y = gelu(y)
    return y.reshape(*x.shape[:-1], -1)


def assert_equal_but_for_rounding_ties(y, want, normed, scales, w):
    """The op's float32 LayerNorm may land a value on the other side of a rounding tie from the float64
    reference's: a code or two of a token move by one step (the token's scale times the row's, times
    the row's largest weight at most), on a few tokens. `normed`: the reference's input to the
    quantizer; `w`: the integer weights (N, K)."""
    step = np.abs(normed).max(-1, keepdims=True) / 127 * scales * np.abs(w).max(1)
    assert (np.abs(y - want) <= 2.01 * step + 1e-4 * (1 + np.abs(want))).all()
    assert (np.abs(y - want) <= 1e-4 * (1 + np.abs(want))).all(-1).mean() >= 0.98


def op_model(op, w, scales, bias=None, w_as_input=False, norm=(), **attrs):
    """One-node graph; `norm` = the inputs from norm_weight on: (weight, bias[, weight2, bias2]), None
    leaving one out, or ()."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    inits = [numpy_helper.from_array(scales, "s")]
    if w_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.UINT8, None))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    names = ["x", "w", "s"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        names.append("b")
    if norm:
        names += [""] * (4 - len(names))
        for i, t in enumerate(norm):
            if t is not None:
                inits.append(numpy_helper.from_array(t, f"n{i}"))
            names.append(f"n{i}" if t is not None else "")
    graph = helper.make_graph([helper.make_node(op, names, ["y"], domain="bitvit", **attrs)], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("bitvit", 1)],
                              ir_version=10)
    return model.SerializeToString()


def session(model, isa="native", threads=2):
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(ortops.library_path(isa)))
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def random_layer(op, n, k, seed):
    rng = np.random.default_rng(seed)
    fmt = OPS[op]
    codes = rng.integers(0, 3 if fmt == "ternary" else 1 << WEIGHT_FORMATS[fmt], (n, k)).astype(np.uint8)
    packed = pack_codes(torch.from_numpy(codes), WEIGHT_FORMATS[fmt]).numpy()
    scales = rng.uniform(0.01, 1.0, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return codes, packed, scales, bias


def test_the_library_builds_from_scratch_with_the_best_kernel_this_cpu_has(ortops_cache):
    path = ortops.library_path()
    assert path.is_file() and path.is_relative_to(ortops_cache)
    flags = set(next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "").split())
    best = ("avx512-vnni" if {"avx512_vnni", "avx512bw"} <= flags else "avx2" if "avx2" in flags else "portable")
    assert ortops.kernel_isa(path) == best  # -march=native: the widest integer dot products this CPU has
    assert ortops.library_path() == path  # cached: the second call builds nothing


def use_fake_compiler(script: str, tmp_path, monkeypatch) -> None:
    """Build the op library with `script` (a shell script) as $CXX, against empty ONNX Runtime headers."""
    fake = tmp_path / "fake-g++"
    fake.write_text(script)
    fake.chmod(0o755)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "onnxruntime_cxx_api.h").write_text("")
    (tmp_path / "include" / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 1\n")
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path / "include"))
    monkeypatch.setenv("BITVIT_ORTOPS_CACHE", str(tmp_path / "cache"))


def new_process() -> None:
    """What a process started from now on would see: the library's keys, computed once a process, computed anew."""
    ortops._build_key.cache_clear()
    ortops._compiler_key.cache_clear()


def test_the_compiler_is_asked_its_version_once_a_process_not_at_every_session(tmp_path, monkeypatch):
    use_fake_compiler(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo asked >> {tmp_path}/asked; echo fake; exit 0; }}\n'
                      'while [ "$1" != -o ]; do shift; done\necho built > "$2"\n', tmp_path, monkeypatch)
    path = ortops.library_path()
    assert [ortops.library_path() for _ in range(3)] == [path] * 3
    assert (tmp_path / "asked").read_text() == "asked\n"


def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    use_fake_compiler('#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'  # counts its builds into
                      'while [ "$1" != -o ]; do shift; done\n'                            # the library it writes
                      f'echo build >> {tmp_path}/builds; cat {tmp_path}/builds > "$2"\n', tmp_path, monkeypatch)
    path = ortops.library_path()
    assert ortops.library_path() == path and path.read_text().count("build") == 1  # cached
    path.write_bytes(path.read_bytes()[:3])                                          # truncated
    assert ortops.library_path() == path and path.read_text().count("build") == 2  # rebuilt


def test_a_library_temporary_that_a_killed_builds_compiler_wrote_after_the_rebuild_is_removed_by_the_next_use(
        tmp_path, monkeypatch):
    """A build killed outright (SIGKILL) leaves its compiler running; it writes the killed process's temporary
    after the rerun's build cleared them, and the library, cached from then on, is never written again."""
    use_fake_compiler(FAKE_BUILD, tmp_path, monkeypatch)
    path = ortops.library_path()
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait(30)
    left, live = (path.with_name(f"{path.name}.{quant.cli._process_space()}.{pid}.tmp") for pid in (ended.pid,
                                                                                                     os.getppid()))
    for temporary in (left, live):
        temporary.write_text("half a library")
    assert ortops.library_path() == path
    assert not left.exists() and live.exists()


def test_a_build_says_it_is_compiling_before_it_compiles_and_a_cached_library_says_nothing(
        tmp_path, monkeypatch, capsys):
    use_fake_compiler('#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'
                      'while [ "$1" != -o ]; do shift; done\necho built > "$2"\n', tmp_path, monkeypatch)
    ortops.library_path()  # seconds to a minute of silence with g++
    assert "compiling bitvit's ONNX Runtime ops" in capsys.readouterr().err
    ortops.library_path()
    assert capsys.readouterr().err == ""


def test_a_fetch_of_the_headers_says_so_before_it_downloads_and_fetched_headers_say_nothing(
        tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    monkeypatch.setenv("BITVIT_ORTOPS_CACHE", str(tmp_path / "cache"))
    said = []  # stderr when the download began (apt-get update and download: seconds, before any compiling)

    def fetch(dest):
        said.append(capsys.readouterr().err)
        (dest / "usr/include/onnxruntime").mkdir(parents=True)
        (dest / "usr/include/onnxruntime/onnxruntime_cxx_api.h").write_text("")
        (dest / "usr/include/onnxruntime/onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 1\n")
    monkeypatch.setattr(ortops, "_fetch_headers", fetch)
    ortops._headers()
    assert said == ["downloading ONNX Runtime's headers to build bitvit's ops (once)...\n"]
    ortops._headers()
    assert len(said) == 1 and capsys.readouterr().err == ""


def test_headers_are_fetched_by_a_user_id_with_no_name(tmp_path, monkeypatch):
    # a container run as a user id the password database lacks, with no $USER: getpass.getuser() raises KeyError
    monkeypatch.setattr("getpass.getuser", lambda: (_ for _ in ()).throw(KeyError("getpwuid(): uid not found")))
    monkeypatch.setattr(ortops, "_debian_archive", lambda: ("http://deb.debian.org/debian", ""))
    ran = []

    def offline(cmd, cwd=None, what=None):
        ran.append(cmd)
        raise ValueError(f"{what} failed (exit 100):\nno network")
    monkeypatch.setattr(ortops, "_run", offline)
    with pytest.raises(ValueError, match="no network"):
        ortops._fetch_headers(tmp_path / "headers")
    assert ran[0][0] == "apt-get" and not any("Sandbox" in part for part in ran[0])


def test_a_process_that_loses_the_race_to_fetch_the_headers_takes_the_winners_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(ortops, "_debian_archive", lambda: ("http://deb.debian.org/debian", ""))
    dest, header = tmp_path / "headers", Path("usr/include/onnxruntime/onnxruntime_cxx_api.h")

    def fake(cmd, cwd=None, what=None):  # apt-get writes a package; dpkg-deb unpacks the header from it
        if cmd[-2:] == ["download", "libonnxruntime-dev"]:
            (Path(cwd) / "libonnxruntime-dev_1.0_amd64.deb").write_text("deb")
        elif cmd[0] == "dpkg-deb":
            (Path(cmd[-1]) / header).parent.mkdir(parents=True)
            (Path(cmd[-1]) / header).write_text("loser")
    monkeypatch.setattr(ortops, "_run", fake)
    replace = os.replace

    def winner_first(src, dst):  # the other process moves its copy in after this one found no dest
        (Path(dst) / header).parent.mkdir(parents=True)
        (Path(dst) / header).write_text("winner")
        replace(src, dst)
    monkeypatch.setattr(os, "replace", winner_first)
    ortops._fetch_headers(dest)
    assert (dest / header).read_text() == "winner" and [p.name for p in tmp_path.iterdir()] == ["headers"]


FAKE_APT = """
def fake(cmd, cwd=None, what=None):  # apt-get writes a package; dpkg-deb unpacks the header from it
    if cmd[-2:] == ["download", "libonnxruntime-dev"]:
        (Path(cwd) / "libonnxruntime-dev_1.0_amd64.deb").write_text("deb")
    elif cmd[0] == "dpkg-deb":
        (Path(cmd[-1]) / "usr/include/onnxruntime").mkdir(parents=True)
        (Path(cmd[-1]) / "usr/include/onnxruntime/onnxruntime_cxx_api.h").write_text("half")
        if KILLED:
            os._exit(137)  # as SIGKILL ends it: nothing after runs
"""


def test_the_half_unpacked_headers_of_a_fetch_killed_outright_are_removed_by_the_next_fetch(tmp_path, monkeypatch):
    dest = tmp_path / "cache" / "headers"
    script = ("import os, sys\nfrom pathlib import Path\nfrom export import ortops\nKILLED = True\n" + FAKE_APT
              + "ortops._debian_archive = lambda: ('http://deb.debian.org/debian', '')\nortops._run = fake\n"
              + f"ortops._fetch_headers(Path({str(dest)!r}))\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=Path(ortops.__file__).parents[1],
                            env=dict(os.environ, TMPDIR=str(tmp_path)), timeout=120)
    assert killed.returncode == 137 and len(list(dest.parent.iterdir())) == 1  # its half copy, beside dest
    scope = {"Path": Path, "os": os, "KILLED": False}
    exec(FAKE_APT, scope)
    monkeypatch.setattr(ortops, "_debian_archive", lambda: ("http://deb.debian.org/debian", ""))
    monkeypatch.setattr(ortops, "_run", scope["fake"])
    ortops._fetch_headers(dest)
    assert [p.name for p in dest.parent.iterdir()] == ["headers"]


def test_a_failed_move_of_the_headers_with_no_other_copy_in_place_is_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(ortops, "_debian_archive", lambda: ("http://deb.debian.org/debian", ""))

    def fake(cmd, cwd=None, what=None):  # apt-get writes a package; dpkg-deb unpacks nothing that matters
        if cmd[-2:] == ["download", "libonnxruntime-dev"]:
            (Path(cwd) / "libonnxruntime-dev_1.0_amd64.deb").write_text("deb")
    monkeypatch.setattr(ortops, "_run", fake)

    def fails(src, dst):  # no winner: the move itself failed (a full disk, no permission)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(PermissionError):
        ortops._fetch_headers(tmp_path / "headers")


def test_headers_changed_in_place_rebuild_the_library(tmp_path, monkeypatch):
    # a library built against newer headers than the runtime that loads it crashes that runtime
    use_fake_compiler('#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'
                      'while [ "$1" != -o ]; do shift; done\n'
                      f'echo build >> {tmp_path}/builds; cat {tmp_path}/builds > "$2"\n', tmp_path, monkeypatch)
    ortops.library_path()
    (tmp_path / "include" / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 0\n")  # same folder
    new_process()
    assert ortops.library_path().read_text().count("build") == 2


def test_a_compiler_command_with_arguments_in_cxx_runs_with_them(tmp_path, monkeypatch):
    use_fake_compiler('#!/bin/sh\n[ "$1" = --wrapped ] || exit 1; shift\n'              # as "ccache g++" would
                      '[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'
                      'while [ "$1" != -o ]; do shift; done\necho built > "$2"\n', tmp_path, monkeypatch)
    monkeypatch.setenv("CXX", f"{tmp_path / 'fake-g++'} --wrapped")
    assert ortops.library_path().read_text() == "built\n"


def test_on_apple_silicon_the_library_is_built_without_march_native_which_apple_clang_refuses(tmp_path, monkeypatch):
    use_fake_compiler('#!/bin/sh\n[ "$1" = --version ] && { echo Apple clang 14; exit 0; }\n'
                      'for a; do [ "$a" = -march=native ] && { echo "clang: error: the clang compiler does not '
                      'support \'-march=native\'" >&2; exit 1; }; done\n'
                      'while [ "$1" != -o ]; do shift; done\necho built > "$2"\n', tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ortops.platform, "machine", lambda: "arm64")
    assert ortops.library_path().read_text() == "built\n"


def test_on_an_intel_mac_the_library_is_still_built_with_march_native(tmp_path, monkeypatch):
    use_fake_compiler('#!/bin/sh\n[ "$1" = --version ] && { echo Apple clang 14; exit 0; }\n'
                      'args="$*"\nwhile [ "$1" != -o ]; do shift; done\necho "$args" > "$2"\n', tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ortops.platform, "machine", lambda: "x86_64")
    assert "-march=native" in ortops.library_path().read_text().split()


def test_on_windows_the_library_is_refused_in_one_line_that_leads_to_standard_ops(tmp_path, monkeypatch):
    use_fake_compiler('#!/bin/sh\nexit 1\n', tmp_path, monkeypatch)  # a g++ (MinGW's) is no help there
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(FileNotFoundError, match="not on Windows.*--standard-ops"):
        ortops.library_path()


def test_a_compiler_that_writes_no_library_is_named(tmp_path, monkeypatch):
    use_fake_compiler('#!/bin/sh\n[ "$1" = --version ] && echo fake 1.0\nexit 0\n', tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="fake-g\\+\\+ wrote no library"):
        ortops.library_path()


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 33, 17, 19), (70, 129, 65), (5, 64, 48), BIG])
def test_ops_match_the_numpy_reference_on_odd_shapes(isa, op, shape):
    *lead, k, n = shape
    codes, packed, scales, bias = random_layer(op, n, k, seed=sum(shape))
    x = np.random.default_rng(1).standard_normal((*lead, k)).astype(np.float32)
    y = session(op_model(op, packed, scales, bias), isa).run(None, {"x": x})[0]
    assert y.shape == (*lead, n)
    np.testing.assert_allclose(y, reference(x, codes, scales, bias, OPS[op]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (70, 129, 65), (2, 5, 128, 48), BIG])
def test_the_input_layernorm_runs_inside_the_op_as_layernorm_then_quantize(isa, op, shape):
    *lead, k, n = shape
    codes, packed, scales, bias = random_layer(op, n, k, seed=sum(shape))
    rng = np.random.default_rng(2)
    norm = (rng.uniform(0.5, 2, k).astype(np.float32), rng.standard_normal(k).astype(np.float32))
    x = (rng.standard_normal((*lead, k)) * 3 + 1).astype(np.float32)
    y = session(op_model(op, packed, scales, bias, norm=norm, epsilon=1e-3), isa).run(None, {"x": x})[0]
    want = reference(x, codes, scales, bias, OPS[op], norm, eps=1e-3)
    assert_equal_but_for_rounding_ties(y, want, layer_norm(x, norm, 1e-3), scales, weights(codes, OPS[op]))


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (70, 129, 65), (2, 5, 128, 48), BIG])
def test_a_second_layernorm_runs_after_the_first_inside_the_op(isa, op, shape):
    *lead, k, n = shape
    codes, packed, scales, bias = random_layer(op, n, k, seed=sum(shape))
    rng = np.random.default_rng(3)
    norms = [rng.uniform(0.5, 2, k).astype(np.float32), rng.standard_normal(k).astype(np.float32),
             rng.uniform(0.5, 2, k).astype(np.float32), rng.standard_normal(k).astype(np.float32)]
    x = (rng.standard_normal((*lead, k)) * 3 + 1).astype(np.float32)
    model = op_model(op, packed, scales, bias, norm=norms, epsilon=1e-6, epsilon2=1e-3)
    y = session(model, isa).run(None, {"x": x})[0]
    want = reference(x, codes, scales, bias, OPS[op], norms[:2], 1e-6, norms[2:], 1e-3)
    assert_equal_but_for_rounding_ties(y, want, layer_norm(layer_norm(x, norms[:2], 1e-6), norms[2:], 1e-3), scales,
                                       weights(codes, OPS[op]))


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (70, 129, 65), BIG])
def test_the_gelu_activation_applies_exact_gelu_to_the_output(isa, op, shape):
    *lead, k, n = shape
    codes, packed, scales, bias = random_layer(op, n, k, seed=sum(shape))
    x = np.random.default_rng(1).standard_normal((*lead, k)).astype(np.float32)
    y = session(op_model(op, packed, scales, bias, activation="gelu"), isa).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, reference(x, codes, scales, bias, OPS[op], act="gelu"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["native", "avx2", "portable"])
def test_the_fused_gelu_is_exact_to_a_few_float32_roundings_from_minus_ten_to_ten(isa):
    v = np.linspace(-10, 10, 200_001).astype(np.float32)     # the outputs before GELU: a token of zeros gives the bias
    _, packed, scales, _ = random_layer("TernaryLinear", v.size, 4, seed=15)
    model = op_model("TernaryLinear", packed, scales, v, activation="gelu")
    y = session(model, isa).run(None, {"x": np.zeros((1, 4), np.float32)})[0][0]
    err = np.abs(y - gelu(v))   # (torch's float32 GELU is up to 1.1e-6 off here, ONNX Runtime's Gelu 4.5e-7)
    assert err.max() <= 1e-6 and (err <= 3e-7 * np.maximum(1, np.abs(v))).all()


@pytest.mark.parametrize("norms", [1, 2])
def test_the_layernorms_default_to_epsilon_1e_5_and_need_no_bias_for_the_linear(norms):
    codes, packed, scales, _ = random_layer("TernaryLinear", 24, 40, seed=11)
    # rows of variance ~1e-5 into both LayerNorms, so that their epsilon shows in the output
    norm = (np.full(40, 0.004, np.float32), np.full(40, 0.25, np.float32),
            np.full(40, 1.5, np.float32), np.zeros(40, np.float32))[:2 * norms]
    x = (np.random.default_rng(4).standard_normal((6, 40)) * 0.003).astype(np.float32)
    y = session(op_model("TernaryLinear", packed, scales, norm=norm)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, reference(x, codes, scales, None, "ternary", norm[:2], 1e-5, norm[2:] or None, 1e-5),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm,match", [((np.ones(16, np.float32), None), "come together"),
                                        ((np.ones(15, np.float32), np.zeros(15, np.float32)), "norm_weight must be"),
                                        ((np.ones(16, np.float32), np.zeros((1, 16), np.float32)), "norm_bias must be"),
                                        ((None, None, np.ones(16, np.float32), np.zeros(16, np.float32)),
                                         "need norm_weight and norm_bias"),
                                        ((np.ones(16, np.float32), np.zeros(16, np.float32), np.ones(16, np.float32)),
                                         "norm2_weight and norm2_bias come together"),
                                        ((np.ones(16, np.float32), np.zeros(16, np.float32), np.ones(16, np.float32),
                                          np.zeros(8, np.float32)), "norm2_bias must be")])
def test_a_layernorm_of_the_wrong_shape_half_given_or_without_the_first_is_refused(norm, match):
    _, packed, scales, bias = random_layer("TernaryLinear", 8, 16, seed=12)
    s = session(op_model("TernaryLinear", packed, scales, bias, norm=norm))
    with pytest.raises(Exception, match=match):
        s.run(None, {"x": np.ones((2, 16), np.float32)})


@pytest.mark.parametrize("isa", list(ortops.ISAS))
@pytest.mark.parametrize("k,offset", [(768, 30.0), (384, 100.0)])
def test_the_input_layernorm_is_as_accurate_as_torchs_on_rows_far_from_zero(isa, k, offset):
    codes, packed, scales, bias = random_layer("TernaryLinear", 16, k, seed=0)
    x = (offset + np.random.default_rng(0).standard_normal((200, k))).astype(np.float32)
    norm = (np.ones(k, np.float32), np.zeros(k, np.float32))
    want = reference(x, codes, scales, bias, "ternary", norm)              # LayerNorm in float64

    def tokens_off(y):
        return int((~np.isclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()).all(-1)).sum())

    normed_by_torch = torch.nn.functional.layer_norm(torch.from_numpy(x), (k,), eps=1e-5).numpy()
    y = session(op_model("TernaryLinear", packed, scales, bias, norm=norm), isa).run(None, {"x": x})[0]
    assert tokens_off(y) <= tokens_off(reference(normed_by_torch, codes, scales, bias, "ternary"))


@pytest.mark.parametrize("isa", list(ortops.ISAS))
def test_the_input_layernorm_normalizes_finite_rows_whose_squares_or_sum_pass_float32s_range(isa):
    """Deviations past 1.8e19 overflow float32 squares (the variance came out inf: the LayerNorm gave
    its bias alone); values near FLT_MAX overflow a float32 sum (the mean), to NaN where signs mix."""
    codes, packed, scales, bias = random_layer("TernaryLinear", 16, 48, seed=19)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 48)).astype(np.float32)
    x[1] *= np.float32(1e20)
    x[2] = rng.uniform(1e38, 3e38, 48)
    x[3] = x[2] * np.tile([1, -1], 24)                                     # sums of +inf and -inf: NaN
    norm = (rng.uniform(0.5, 2, 48).astype(np.float32), rng.standard_normal(48).astype(np.float32))
    y = session(op_model("TernaryLinear", packed, scales, bias, norm=norm), isa).run(None, {"x": x})[0]
    assert_equal_but_for_rounding_ties(y, reference(x, codes, scales, bias, "ternary", norm), layer_norm(x, norm, 1e-5),
                                       scales, weights(codes, "ternary"))


@pytest.mark.parametrize("isa", list(ortops.ISAS))
@pytest.mark.parametrize("norms,act", [(0, "none"), (1, "none"), (2, "gelu")])
def test_a_token_holding_nan_or_inf_gives_nan_outputs_and_leaves_the_others_alone(isa, norms, act):
    codes, packed, scales, bias = random_layer("TernaryLinear", 8, 40, seed=14)
    x = np.random.default_rng(5).standard_normal((4, 40)).astype(np.float32)
    x[1, 33], x[2, 3] = np.nan, -np.inf                              # one in the vector body, one in the tail
    norm = (np.ones(40, np.float32), np.zeros(40, np.float32)) * norms
    y = session(op_model("TernaryLinear", packed, scales, bias, norm=norm, activation=act), isa).run(None, {"x": x})[0]
    assert np.isnan(y[1:3]).all()
    want = reference(x[[0, 3]], codes, scales, bias, "ternary", norm[:2] or None, norm2=norm[2:] or None, act=act)
    np.testing.assert_allclose(y[[0, 3]], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eps,match", [(0.0, "must be a positive finite"), (-1e-5, "must be a positive finite"),
                                       (float("inf"), "must be a positive finite"), (1, "must be a float"),
                                       ("1e-5", "must be a float")])
@pytest.mark.parametrize("name", ["epsilon", "epsilon2"])
def test_an_epsilon_that_is_not_a_positive_finite_float_is_refused(eps, match, name):
    _, packed, scales, bias = random_layer("BinaryLinear", 8, 16, seed=13)
    norm = (np.ones(16, np.float32), np.zeros(16, np.float32)) * 2
    with pytest.raises(Exception, match=f"{name} {match}"):
        session(op_model("BinaryLinear", packed, scales, bias, norm=norm, **{name: eps}))


@pytest.mark.parametrize("act,match", [("relu", 'activation must be "none" or "gelu"'),
                                       (1, "activation must be a string")])
def test_an_unknown_activation_is_refused(act, match):
    _, packed, scales, bias = random_layer("TernaryLinear", 8, 16, seed=16)
    with pytest.raises(Exception, match=match):
        session(op_model("TernaryLinear", packed, scales, bias, activation=act))


def test_an_activation_holding_a_nul_character_is_refused():
    _, packed, scales, bias = random_layer("TernaryLinear", 8, 16, seed=16)
    with pytest.raises(Exception, match="activation holds a NUL character"):
        session(op_model("TernaryLinear", packed, scales, bias, activation="gelu\0x"))


@pytest.mark.parametrize("isa", list(ortops.ISAS))
def test_a_token_of_denormals_too_small_for_a_scale_gives_the_bias(isa):
    _, packed, scales, bias = random_layer("Int8Linear", 4, 40, seed=17)
    x = np.zeros((2, 40), np.float32)
    x[0, ::3] = np.float32(1.4e-45)           # below 127 * the smallest denormal: its scale rounds to 0
    y = session(op_model("Int8Linear", packed, scales, bias), isa).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, np.stack([bias, bias]))


@pytest.mark.parametrize("op, k_max", [("Int8Linear", 33155), ("Int4Linear", 563644)])
def test_input_features_beyond_what_int32_sums_hold_exactly_are_refused(op, k_max):
    _, packed, scales, bias = random_layer(op, 1, k_max + 1, seed=18)
    with pytest.raises(Exception, match=f"{k_max + 1} input features are over the {k_max}"):
        session(op_model(op, packed, scales, bias)).run(None, {"x": np.ones((1, k_max + 1), np.float32)})
    _, packed, scales, bias = random_layer(op, 1, k_max, seed=18)
    assert session(op_model(op, packed, scales, bias)).run(None, {"x": np.ones((1, k_max), np.float32)})[0].shape \
        == (1, 1)


@pytest.mark.parametrize("isa", list(ortops.ISAS))
def test_int8_weights_and_activations_at_their_extremes_sum_exactly(isa):
    # |c * q| up to 255 * 127: a pair of them overflows the int16 sums of AVX2's vpmaddubsw if added naively
    codes = np.tile(np.array([[255, 0], [0, 255], [255, 255]], np.uint8), (1, 100))      # w = 127 / -128
    x = np.tile(np.array([[1, -1], [-1, -1], [1, 1]], np.float32), (1, 100))            # q = +-127
    scales = np.ones(3, np.float32)
    y = session(op_model("Int8Linear", codes, scales), isa).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, reference(x, codes, scales, None, "int8").astype(np.float32))


@pytest.mark.parametrize("op", list(OPS))
def test_weights_given_at_run_time_and_no_bias_give_the_same_result(op):
    codes, packed, scales, _ = random_layer(op, 20, 40, seed=3)
    x = np.random.default_rng(2).standard_normal((6, 40)).astype(np.float32)
    y = session(op_model(op, None, scales, w_as_input=True)).run(None, {"x": x, "w": packed})[0]
    np.testing.assert_allclose(y, reference(x, codes, scales, None, OPS[op]), rtol=1e-5, atol=1e-5)


def test_a_token_of_zeros_gives_the_bias_and_single_threaded_runs_agree():
    codes, packed, scales, bias = random_layer("TernaryLinear", 30, 50, seed=4)
    x = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
    x[2] = 0
    model = op_model("TernaryLinear", packed, scales, bias)
    y = session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y[2], bias)
    np.testing.assert_array_equal(y, session(model, threads=1).run(None, {"x": x})[0])


@pytest.mark.parametrize("width", [16, 41 + 16], ids=["narrower", "wider"])
@pytest.mark.parametrize("op", list(OPS))
def test_input_of_the_wrong_width_is_refused_with_an_error_not_a_crash(op, width):
    _, packed, scales, bias = random_layer(op, 8, 40, seed=6)
    s = session(op_model(op, packed, scales, bias))
    with pytest.raises(Exception, match="input features need"):
        s.run(None, {"x": np.ones((2, width), np.float32)})
    assert s.run(None, {"x": np.ones((2, 40), np.float32)})[0].shape == (2, 8)  # still serving


def test_scales_of_the_wrong_length_are_refused():
    _, packed, scales, bias = random_layer("BinaryLinear", 8, 16, seed=7)
    with pytest.raises(Exception, match="one value per output row"):
        session(op_model("BinaryLinear", packed, scales[:5], bias)).run(None, {"x": np.ones((1, 16), np.float32)})


def test_scales_of_shape_n_by_1_give_what_a_vector_of_them_gives():
    _, packed, scales, bias = random_layer("TernaryLinear", 8, 16, seed=7)
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    y = session(op_model("TernaryLinear", packed, scales, bias)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(session(op_model("TernaryLinear", packed, scales[:, None], bias)).run(
        None, {"x": x})[0], y)


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (8, 1, 1)])
def test_scales_of_another_shape_than_n_or_n_by_1_are_refused_naming_both(shape):
    _, packed, scales, bias = random_layer("BinaryLinear", 8, 16, seed=7)
    with pytest.raises(Exception, match=re.escape(f"of shape (8,) or (8, 1), got shape {shape}")):
        session(op_model("BinaryLinear", packed, scales.reshape(shape), bias)).run(
            None, {"x": np.ones((1, 16), np.float32)})


def test_weights_that_are_not_uint8_codes_are_refused():
    _, _, scales, bias = random_layer("TernaryLinear", 4, 8, seed=8)
    with pytest.raises(Exception, match=r"tensor\(int8\)' of input parameter \(w\)"):  # the op's declared uint8 input
        session(op_model("TernaryLinear", np.zeros((4, 2), np.int8), scales, bias))


def test_weights_of_the_wrong_rank_are_refused():
    _, _, scales, bias = random_layer("TernaryLinear", 4, 8, seed=9)
    with pytest.raises(Exception, match="must be 2-D"):
        session(op_model("TernaryLinear", np.zeros((4, 2, 1), np.uint8), scales, bias))


@pytest.mark.parametrize("shape", [(0, 2), (4, 0)])
def test_weights_with_no_rows_or_no_bytes_are_refused_as_empty_not_as_of_the_wrong_rank(shape):
    with pytest.raises(Exception, match=r"W must hold at least one output row of at least one byte, got shape"):
        session(op_model("TernaryLinear", np.zeros(shape, np.uint8), np.ones(shape[0], np.float32)))


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="unknown isa"):
        ortops.library_path("sse9")


@pytest.mark.parametrize("isa", list(ortops.ISAS))
def test_outputs_are_the_float32_product_of_the_exact_dot_and_the_two_scales(isa):
    """Without a bias, Y = float32(dot) * s * scale in float32, bit for bit, with s = max|x| / 127 divided
    in float32 (not multiplied by a rounded 1/127) and q = x / s rounded half to even."""
    codes, packed, scales, _ = random_layer("Int8Linear", 20, 48, seed=17)
    x = np.random.default_rng(6).standard_normal((256, 48)).astype(np.float32)
    s = np.abs(x).max(-1, keepdims=True) / np.float32(127)
    dot = np.clip(np.round(x / s), -127, 127).astype(np.int64) @ weights(codes, "int8").astype(np.int64).T
    y = session(op_model("Int8Linear", packed, scales), isa).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, dot.astype(np.float32) * s * scales[None])


@pytest.mark.parametrize("isa", list(ortops.ISAS))
def test_activations_exactly_halfway_between_two_codes_round_to_the_even_one(isa):
    # max |x| = 127 makes s = 1: the codes are the rounded values themselves, ties in the vector body and tail
    ties = np.array([2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5], np.float32)
    x = np.concatenate([[127], ties, ties, ties[:3]]).astype(np.float32)[None]   # 24 features
    k = x.shape[1]
    codes = (np.eye(k, dtype=np.uint8) + 128).astype(np.uint8)                   # w = identity
    y = session(op_model("Int8Linear", codes, np.ones(k, np.float32)), isa).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, np.round(x))


@pytest.mark.parametrize("isa", list(ortops.ISAS))
def test_a_nan_among_the_first_features_gives_nan_outputs(isa):
    """A NaN in the AVX-512 kernel's 16-wide vector body (here its first block of two), not only in the
    scalar tail, makes the token's scale and outputs NaN."""
    codes, packed, scales, bias = random_layer("TernaryLinear", 8, 40, seed=18)
    x = np.random.default_rng(7).standard_normal((3, 40)).astype(np.float32)
    x[1, 5] = np.nan
    y = session(op_model("TernaryLinear", packed, scales, bias), isa).run(None, {"x": x})[0]
    assert np.isnan(y[1]).all()
    np.testing.assert_allclose(y[[0, 2]], reference(x[[0, 2]], codes, scales, bias, "ternary"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [0, 2, 4, 6])
def test_ternary_code_3_is_refused_in_any_of_the_four_places_of_a_byte_when_the_session_is_created(shift):
    _, packed, scales, bias = random_layer("TernaryLinear", 4, 8, seed=5)
    packed[2, 1] |= 0b11 << shift
    with pytest.raises(Exception, match=f"W row 2 holds the 2-bit code 3 at input {4 + shift // 2}"):
        session(op_model("TernaryLinear", packed, scales, bias))


def test_more_scales_than_output_rows_are_refused():
    _, packed, scales, bias = random_layer("BinaryLinear", 8, 16, seed=7)
    too_many = np.concatenate([scales, scales])
    with pytest.raises(Exception, match="one value per output row"):
        session(op_model("BinaryLinear", packed, too_many, bias)).run(None, {"x": np.ones((1, 16), np.float32)})


def test_a_bias_longer_than_the_output_rows_is_refused():
    _, packed, scales, bias = random_layer("TernaryLinear", 8, 16, seed=10)
    with pytest.raises(Exception, match=r"bias must be float32 of shape \(8,\)"):
        session(op_model("TernaryLinear", packed, scales, np.append(bias, 0).astype(np.float32))).run(
            None, {"x": np.ones((1, 16), np.float32)})


def test_an_onnx_runtime_older_than_the_headers_gets_an_error_status_not_a_crash(tmp_path):
    # ONNX Runtime's entry point, wrapped to serve no API version newer than 1 (an old runtime's), hands the
    # library's RegisterCustomOps a status naming the version; before, it went on with a null API and crashed
    script = tmp_path / "old_runtime.py"
    script.write_text(f"""
import ctypes, glob, os, onnxruntime
ort = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*"))[0])
GetApi = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
Version = ctypes.CFUNCTYPE(ctypes.c_char_p)
class Base(ctypes.Structure):
    _fields_ = [("GetApi", GetApi), ("GetVersionString", Version)]
ort.OrtGetApiBase.restype = ctypes.POINTER(Base)
real = ort.OrtGetApiBase().contents
old = Base(GetApi(lambda v: real.GetApi(v) if v == 1 else None), Version(lambda: b"1.0.0"))
lib = ctypes.CDLL({str(ortops.library_path())!r})
lib.RegisterCustomOps.restype = ctypes.c_void_p
status = lib.RegisterCustomOps(None, ctypes.byref(old))
api = ctypes.cast(real.GetApi(1), ctypes.POINTER(ctypes.c_void_p))  # OrtApi[2]: GetErrorMessage
message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(api[2])
print(message(status).decode())
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "built for ONNX Runtime's C API version" in done.stdout and "(1.0.0) does not serve" in done.stdout


@pytest.mark.parametrize("width", [21, 19])
@pytest.mark.parametrize("op", list(OPS))
def test_an_input_of_another_width_within_the_same_packed_bytes_is_refused(op, width):
    # 19 to 24 binary inputs pack into 3 bytes: only the attribute tells that padding codes would count (21) or
    # the layer's 20th weight be dropped (19)
    _, packed, scales, bias = random_layer(op, 8, 20, seed=11)
    s = session(op_model(op, packed, scales, bias, in_features=20))
    with pytest.raises(Exception, match=rf"X has {width} input features, but the layer takes 20 \(attribute"):
        s.run(None, {"x": np.ones((2, width), np.float32)})
    assert s.run(None, {"x": np.ones((2, 20), np.float32)})[0].shape == (2, 8)


@pytest.mark.parametrize("value,match", [(0, "in_features must be at least 1, got 0"),
                                         (20.0, "in_features must be an integer attribute")])
def test_an_in_features_that_is_not_a_positive_integer_is_refused(value, match):
    _, packed, scales, bias = random_layer("BinaryLinear", 8, 20, seed=11)
    with pytest.raises(Exception, match=match):
        session(op_model("BinaryLinear", packed, scales, bias, in_features=value))


def test_a_library_built_before_the_compiler_was_removed_is_loaded_not_refused(tmp_path, monkeypatch):
    use_fake_compiler('#!/bin/sh\n[ "$1" = --version ] && { echo fake 1.0; exit 0; }\n'
                      'while [ "$1" != -o ]; do shift; done\necho built > "$2"\n', tmp_path, monkeypatch)
    path = ortops.library_path()
    monkeypatch.setenv("CXX", str(tmp_path / "removed-g++"))
    assert ortops.library_path() == path
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path / "no-headers"))  # nothing built against them: the compiler
    with pytest.raises(FileNotFoundError, match="no C\\+\\+ compiler .*removed-g\\+\\+"):  # is what is missing
        ortops.library_path()


FAKE_BUILD = ('#!/bin/sh\n[ "$1" = --version ] && { echo fake ${FAKE_VERSION:-1.0}; exit 0; }\n'
              'while [ "$1" != -o ]; do shift; done\necho built > "$2"\n')


def test_without_the_compiler_a_damaged_library_is_refused_not_loaded(tmp_path, monkeypatch):
    use_fake_compiler(FAKE_BUILD, tmp_path, monkeypatch)
    ortops.library_path().write_text("damaged")
    monkeypatch.setenv("CXX", str(tmp_path / "removed-g++"))
    with pytest.raises(FileNotFoundError, match="no C\\+\\+ compiler"):
        ortops.library_path()


def test_without_the_compiler_a_forced_rebuild_is_refused_not_served_from_the_cache(tmp_path, monkeypatch):
    use_fake_compiler(FAKE_BUILD, tmp_path, monkeypatch)
    ortops.library_path()
    monkeypatch.setenv("CXX", str(tmp_path / "removed-g++"))
    with pytest.raises(FileNotFoundError, match="no C\\+\\+ compiler"):
        ortops.library_path(force=True)


def test_another_compiler_version_builds_a_library_of_its_own(tmp_path, monkeypatch):
    use_fake_compiler(FAKE_BUILD, tmp_path, monkeypatch)
    first = ortops.library_path()
    monkeypatch.setenv("FAKE_VERSION", "2.0")
    new_process()
    second = ortops.library_path()
    assert second != first and second.parent.parent == first.parent.parent and first.is_file()


def test_on_an_intel_mac_another_cpus_features_build_a_library_of_their_own(tmp_path, monkeypatch):
    # macOS has no /proc/cpuinfo: sysctl's CPU features tell two Macs' -march=native builds apart
    use_fake_compiler(FAKE_BUILD, tmp_path, monkeypatch)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sysctl").write_text(  # one line per key asked for, as sysctl -n prints them
        '#!/bin/sh\nfor key; do case "$key" in\n'
        '  machdep.cpu.brand_string) echo "Intel(R) Core(TM) i9";;\n'
        '  machdep.cpu.features) echo "FPU SSE4.2 AVX1.0";;\n'
        '  machdep.cpu.leaf7_features) echo "$FAKE_LEAF7";;\n'  # where an Intel Mac lists AVX2 and AVX-512
        'esac; done\n')
    (tmp_path / "bin" / "sysctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ortops.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("FAKE_LEAF7", "AVX2 AVX512F")
    first = ortops.library_path()
    monkeypatch.setenv("FAKE_LEAF7", "AVX2")
    new_process()
    second = ortops.library_path()
    assert second.parent.parent != first.parent.parent and first.is_file()


def test_on_arm_linux_another_cpus_features_build_a_library_of_their_own(tmp_path, monkeypatch):
    # Arm's /proc/cpuinfo lists them as "Features", not x86's "flags": an SVE build ran on a CPU without SVE
    use_fake_compiler(FAKE_BUILD, tmp_path, monkeypatch)
    monkeypatch.setattr(ortops, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(ortops.platform, "machine", lambda: "aarch64")
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    first = ortops.library_path()
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    new_process()
    second = ortops.library_path()
    assert second.parent.parent != first.parent.parent and first.is_file()


def test_a_headers_copy_left_under_this_processs_own_number_is_not_taken_into_the_fetched_one(tmp_path, monkeypatch):
    """A process killed outright whose number this one now has left its half copy where this one unpacks."""
    dest = tmp_path / "cache" / "headers"
    left = quant.cli.temporary_of(dest)
    (left / "usr/include/onnxruntime").mkdir(parents=True)
    (left / "usr/include/onnxruntime/stale.h").write_text("half")
    scope = {"Path": Path, "os": os, "KILLED": False}
    exec(FAKE_APT, scope)
    monkeypatch.setattr(ortops, "_debian_archive", lambda: ("http://deb.debian.org/debian", ""))
    monkeypatch.setattr(ortops, "_run", scope["fake"])
    ortops._fetch_headers(dest)
    assert sorted(p.name for p in (dest / "usr/include/onnxruntime").iterdir()) == ["onnxruntime_cxx_api.h"]
    assert [p.name for p in dest.parent.iterdir()] == ["headers"]


def test_two_threads_of_one_process_fetching_the_headers_at_once_both_get_them_whole(tmp_path, monkeypatch):
    """Threads share their process's number, and so the folder a fetch unpacks into (temporary_of)."""
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    monkeypatch.setenv("BITVIT_ORTOPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ortops, "_debian_archive", lambda: ("http://deb.debian.org/debian", ""))
    dest, unpacking, second = tmp_path / "cache" / "headers", [], threading.Event()

    def fake(cmd, cwd=None, what=None):  # the first unpack, halfway, waits a while for a second to begin, which
        if cmd[-2:] == ["download", "libonnxruntime-dev"]:                 # goes on once the first is moved in
            (Path(cwd) / "libonnxruntime-dev_1.0_amd64.deb").write_text("deb")
        elif cmd[0] == "dpkg-deb":
            unpacking.append(cmd[-1])
            include = Path(cmd[-1]) / "usr/include/onnxruntime"
            if len(unpacking) == 1:
                include.mkdir(parents=True)
                (include / "onnxruntime_cxx_api.h").write_text("")
                second.wait(0.5)
            else:
                second.set()
                for _ in range(50):
                    if dest.exists():
                        break
                    time.sleep(0.01)
                include.mkdir(parents=True, exist_ok=True)
                (include / "onnxruntime_cxx_api.h").write_text("")
            include.mkdir(parents=True, exist_ok=True)  # (as tar makes the folders of what it unpacks)
            (include / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 1\n")
    monkeypatch.setattr(ortops, "_run", fake)
    got, failed = [], []

    def headers():
        try:
            got.append(ortops._headers())
        except Exception as e:
            failed.append(e)
    threads = [threading.Thread(target=headers) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failed == [] and len(got) == 2 and len(unpacking) == 1  # fetched once
    assert sorted(p.name for p in got[0].iterdir()) == ["onnxruntime_c_api.h", "onnxruntime_cxx_api.h"]
