"""The Triton kernels, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before
triton is imported, so the checks in triton_checks.py run in their own process)."""
import os
import re
import subprocess
import sys
from pathlib import Path

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
    tiling is launched once, untimed, one that fails to launch is passed over, and the first is used; a
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
