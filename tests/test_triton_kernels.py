"""The Triton kernels, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before
triton is imported, so the checks in triton_checks.py run in their own process)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def test_triton_kernels_pass_their_checks_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                        "tests/triton_checks.py"], cwd=TESTS.parent, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 50, r.stdout[-2000:]  # the checks ran, not skipped


def test_a_compile_only_tuner_launches_every_candidate_once_and_keeps_no_pick(monkeypatch):
    """BITVIT_TUNE=compile (gpu_session.sh fills Triton's cache with it beside the reference run): each
    tiling is launched once per key, untimed, one that fails to launch is passed over, and the first is used; a
    later tuning run still times them all."""
    from cuda_ops import triton_kernels as tk
    monkeypatch.setenv("BITVIT_TUNE", "compile")
    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setattr(tk.torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build has no CUDA
    launched = []

    def launch(cfg):
        launched.append(cfg)
        if cfg.block_m == 32:
            raise RuntimeError("out of resource: shared memory")

    candidates = [tk.Config(16, 64, 128, 4, 4), tk.Config(32, 64, 256, 4, 4), tk.Config(64, 64, 256, 4, 4)]
    tuner = tk.Tuner()
    for _ in range(3):  # the op's later calls with that key launch nothing more
        assert tuner.pick(("a8", 2, 256, 768, 768), candidates, launch) == candidates[0]
    assert launched == candidates and tuner.best == {}


def test_the_tuner_picks_the_fastest_replay_and_passes_over_a_tiling_that_does_not_launch(monkeypatch):
    """Each candidate is launched once (compiling it), then timed as a CUDA-graph replay (`replay_ms`); one
    that fails either way is passed over, and the fastest is remembered for the key."""
    from cuda_ops import triton_kernels as tk
    monkeypatch.setenv("BITVIT_TUNE", "1")
    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setattr(tk.torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build has no CUDA
    candidates = [tk.Config(16, 64, 128, 4, 4), tk.Config(32, 64, 256, 4, 4), tk.Config(64, 64, 256, 4, 4)]
    candidates.append(tk.Config(128, 64, 256, 8, 3))  # launches, but its timing fails: passed over too
    replay = {candidates[0]: 0.030, candidates[1]: 0.010, candidates[2]: 0.020, candidates[3]: 0.001}  # ms
    current = []

    def launch(cfg):
        current[:] = [cfg]
        if cfg.block_m == 32:
            raise RuntimeError("out of resource: shared memory")

    def replay_ms(fn):
        fn()
        if current[0].block_m == 128:
            raise tk.torch.OutOfMemoryError("CUDA out of memory")
        return replay[current[0]]

    monkeypatch.setattr(tk, "replay_ms", replay_ms)
    tuner = tk.Tuner()
    key = ("a8", 2, 256, 768, 768)
    assert tuner.pick(key, candidates, launch) == candidates[2]
    assert set(tuner.timings[key]) == {candidates[0], candidates[2]}
    assert tuner.pick(key, candidates, lambda cfg: 1 / 0) == candidates[2]  # remembered: nothing launched


def test_row_counts_are_bucketed_up_to_a_power_of_two_from_16():
    """The tuner's M bucket (part of its key, and what decides the tilings tried): 16 for up to 16 rows,
    else the next power of two at or above M -- a power of two is its own bucket."""
    from cuda_ops import triton_kernels as tk
    assert [tk._bucket(m) for m in (1, 16, 17, 32, 197, 256, 257, 1024)] == [16, 16, 32, 32, 256, 256, 512, 1024]


def test_weight_only_k_tiles_are_halved_only_to_fit_inside_a_group(monkeypatch):
    """A K tile must not straddle two groups: it is halved until it divides group_size, but a single group
    spanning all of K (group_size == K, however odd) keeps the full tiles."""
    from cuda_ops import triton_kernels as tk
    monkeypatch.setattr(tk, "INTERPRET", False)
    assert min(c.block_k for c in tk.weight_only_candidates(19, 300, 300)) >= 64  # the tiles' own 64 or 128
    assert {c.block_k for c in tk.weight_only_candidates(19, 32, 300)} == {32}


def test_a_weight_only_config_whose_k_tile_splits_a_group_is_refused_before_launching():
    from cuda_ops import triton_kernels as tk
    x, packed = tk.torch.zeros(2, 300), tk.torch.zeros(4, 150, dtype=tk.torch.uint8)
    scales, out = tk.torch.ones(4, 5), tk.torch.empty(2, 4)
    with pytest.raises(ValueError, match="splits groups of 64"):
        tk.weight_only_gemm(x, packed, scales, None, None, None, 4, 64, out, tk.Config(16, 32, 128))


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_trit_planes_launched_at_other_than_2_bits_are_refused(bits):
    from cuda_ops import triton_kernels as tk
    x, packed, out = tk.torch.zeros(2, 100), tk.torch.zeros(4, 20, dtype=tk.torch.uint8), tk.torch.empty(2, 4)
    with pytest.raises(ValueError, match="bits must be 2"):
        tk.a8_gemm(x, packed, tk.torch.ones(4), None, out, bits, 1, 1, trits=True)


def test_a_layer_with_an_input_layer_norm_refuses_a_config_that_quantizes_inside_the_gemm():
    from cuda_ops import triton_kernels as tk
    x, packed, out = tk.torch.zeros(2, 100), tk.torch.zeros(4, 25, dtype=tk.torch.uint8), tk.torch.empty(2, 4)
    norm = tk.Norm(None, None, 1e-6)
    with pytest.raises(ValueError, match="quantizes in quantize_rows"):
        tk.a8_gemm(x, packed, tk.torch.ones(4), None, out, 2, 1, 1, norm, tk.Config(16, 32, 64, fuse=True))


def test_a_single_candidate_is_used_untimed(monkeypatch):
    """Nothing to choose between: the tuner neither launches nor times it, and remembers no pick."""
    from cuda_ops import triton_kernels as tk
    monkeypatch.setenv("BITVIT_TUNE", "1")
    monkeypatch.setattr(tk, "INTERPRET", False)
    monkeypatch.setattr(tk.torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build has no CUDA
    monkeypatch.setattr(tk, "replay_ms", lambda fn: pytest.fail("timed a single candidate"))
    tuner, only = tk.Tuner(), tk.Config(16, 64, 128, 4, 4)
    assert tuner.pick(("a8", 2, 16, 64, 64), [only], lambda cfg: pytest.fail("launched a single candidate")) == only
    assert tuner.best == {}
