"""Training: the loss falls, the schedule has its shape, and an interrupted run resumes exactly."""
import dataclasses
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quant.train
from quant.augment import AugmentConfig
from quant.cli import run
from quant.data import ImageSet
from quant.distill import distill_loss, soft_cross_entropy
from quant.models import VisionTransformer
from quant.train import TrainConfig, fit, lr_at, main, read_log
from tests.conftest import TINY, synthetic_images, write_tree

NO_AUG = AugmentConfig(crop_padding=0, flip=False, trivial_augment=False, mixup_alpha=0,
                       cutmix_alpha=0, label_smoothing=0)


def colour_set(per_class: int, seed: int = 0) -> ImageSet:
    images = np.concatenate([synthetic_images(per_class, 16, c, seed + c) for c in range(3)])
    return ImageSet(images, np.repeat(np.arange(3), per_class), TINY.classes)


def test_loss_falls_on_a_learnable_task(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=3e-3, warmup_epochs=0.5, augment=NO_AUG)
    model, done = fit(VisionTransformer(TINY), colour_set(32), colour_set(8, seed=5), cfg, tmp_path,
                      progress=False)
    assert done
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"]
    assert log[-1]["val_top1"] >= 0.9
    assert not model.training


def test_an_epochs_log_record_is_on_disk_before_the_resume_state_that_counts_it(tmp_path, monkeypatch):
    """A power cut after both writes must not keep the resume state of an epoch whose record it lost."""
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(f"-> {Path(dst).name}") or replace(src, dst))
    cfg = TrainConfig(epochs=1, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    assert events.index("log.jsonl") < events.index("-> last.pt")


def test_an_epochs_log_record_is_written_out_before_it_is_synced(tmp_path, monkeypatch):
    """Synced while still in the process's buffer, the record would not be on disk all the same."""
    synced, fsync = [], os.fsync

    def look(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == "log.jsonl":
            synced.append(len((tmp_path / "log.jsonl").read_text().splitlines()))
        fsync(fd)
    monkeypatch.setattr(os, "fsync", look)
    cfg = TrainConfig(epochs=1, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    assert synced == [1]

def test_scoring_val_shows_a_bar_as_the_epochs_do(tmp_path, capsys):
    cfg = TrainConfig(epochs=1, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), colour_set(4, seed=5), cfg, tmp_path)
    assert re.search(r"evaluating: +0%\|[^|]*\| 0/12 ", capsys.readouterr().err)  # 12 val images


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.01)
    lrs = [lr_at(s, 100, 10, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.01, rel=1e-9)  # the last step is at min_lr, not a step short of it


def test_a_schedule_with_one_step_after_its_warmup_takes_that_last_step_at_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.01)
    assert [lr_at(s, 2, 1, cfg) for s in range(2)] == pytest.approx([1.0, 0.01])  # that step is also the last: min_lr


def test_a_peak_rate_below_min_lr_is_never_exceeded():
    cfg = TrainConfig(lr=1e-6, min_lr=1e-5)  # --lr 1e-6 rose to the default min_lr, 10x the rate asked for
    assert max(lr_at(s, 100, 10, cfg) for s in range(100)) == pytest.approx(1e-6)
    assert max(lr_at(s, 100, 10, dataclasses.replace(cfg, lr=0.0)) for s in range(100)) == 0.0


def test_a_cut_warmups_peak_below_min_lr_is_never_exceeded():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5)  # a warmup cut short at 2e-6 decays from there, not up to min_lr
    assert max(lr_at(s, 100, 10, cfg, peak=2e-6) for s in range(10, 100)) == pytest.approx(2e-6)


def test_time_budget_decays_the_rate_over_seconds_or_steps_whichever_run_out_first():
    cfg = TrainConfig(lr=1.0, min_lr=0.01, time_budget=60)
    assert lr_at(5, 10_010, 10, cfg, seconds=30) == pytest.approx(0.6)  # warmup still counts steps
    assert lr_at(10, 10_010, 10, cfg, seconds=0) == pytest.approx(1.0)
    assert lr_at(50, 10_010, 10, cfg, seconds=30) == pytest.approx(0.505, abs=1e-3)
    assert lr_at(11, 10_010, 10, cfg, seconds=90) == pytest.approx(0.01)
    assert lr_at(55, 101, 10, cfg, seconds=1) == pytest.approx(0.505)  # the epochs ran out first


class FakeClock:
    """quant.train's `time`: the clock advances 0.1 s at each reading and by what `sleep` asks, so that the
    time-budget tests see the same seconds on an idle and on a busy machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.1
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    time = staticmethod(time.time)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(quant.train, "time", fake)
    return fake


def fit_on_fake_clock(cfg: TrainConfig, out, monkeypatch, time_limit=None) -> bool:
    """`fit` of a fresh tiny model, seed 0, on a fresh fake clock; whether it finished."""
    monkeypatch.setattr(quant.train, "time", FakeClock())
    torch.manual_seed(0)
    return fit(VisionTransformer(TINY), colour_set(8), None, cfg, out, progress=False, time_limit=time_limit)[1]


@pytest.fixture
def rates(monkeypatch) -> dict[int, float]:
    """The learning rate `fit` sets at each step, by step (a resumed run's replace the earlier run's)."""
    lrs = {}

    def spy(step, *args, **kwargs):
        lrs[step] = lr_at(step, *args, **kwargs)
        return lrs[step]
    monkeypatch.setattr(quant.train, "lr_at", spy)
    return lrs


def test_time_budget_ends_training_at_the_first_epoch_that_spends_it(tmp_path, clock):
    cfg = TrainConfig(epochs=10_000, batch_size=8, lr=1e-3, warmup_epochs=1, time_budget=2.0, augment=NO_AUG)
    _, done = fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert done and 1 < len(log) < 10_000
    assert log[-1]["trained_seconds"] >= 2.0 > log[-2]["trained_seconds"]
    lrs = [r["lr"] for r in log[1:]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.3e-3


class _SlowFirstStep(VisionTransformer):
    """A model whose first forward pass takes three seconds of the clock, as torch.compile's first step does
    on CUDA."""

    def __init__(self, cfg, clock: FakeClock):
        super().__init__(cfg)
        self.clock = clock

    def forward(self, x):
        if not getattr(self, "warm", False):
            self.warm = True
            self.clock.sleep(3.0)
        return super().forward(x)


def test_a_budget_shorter_than_the_warmup_cuts_the_warmup_so_the_rate_still_decays(tmp_path, clock):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=20, time_budget=2.0, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    lrs = [r["lr"] for r in read_log(tmp_path / "log.jsonl")]  # 3 steps an epoch, 0.1 s a step: 7 epochs
    assert max(lrs) > 0.5 * cfg.lr and lrs[-1] < 0.1 * cfg.lr  # without the cut: ended mid-warmup, at 35 %


def test_a_budgets_cosine_starts_at_the_peak_where_a_cut_warmup_ends(tmp_path, clock, rates):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=20, time_budget=2.0, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    lrs = [rates[s] for s in sorted(rates)]
    end = lrs.index(max(lrs)) + 1  # the first step after the warmup
    assert lrs[end] == pytest.approx(cfg.lr)  # the decay starts where the cut warmup ends, not at the budget's start


def test_a_runs_first_step_is_timed_apart_and_not_charged_to_the_time_budget(tmp_path, clock):
    cfg = TrainConfig(epochs=10_000, batch_size=8, time_budget=1.5, augment=NO_AUG)
    fit(_SlowFirstStep(TINY, clock), colour_set(8), None, cfg, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["first_step_seconds"] >= 3.0 and log[0]["seconds"] >= 3.0
    assert log[0]["trained_seconds"] < 1.5 and len(log) > 1
    assert all("first_step_seconds" not in r for r in log[1:])


def test_a_slow_first_step_does_not_make_the_time_limit_stop_training_early(tmp_path, clock):
    cfg = TrainConfig(epochs=3, batch_size=8, augment=NO_AUG)
    _, done = fit(_SlowFirstStep(TINY, clock), colour_set(8), None, cfg, tmp_path, progress=False, time_limit=5.5)
    assert done  # the second epoch is forecast without the first step's three seconds


@pytest.mark.parametrize("end_within", [False, True])
def test_a_budget_the_time_limit_cuts_short_shrinks_to_fit_when_asked(tmp_path, clock, end_within):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=1, time_budget=30.0, augment=NO_AUG)
    _, done = fit(_SlowFirstStep(TINY, clock), colour_set(8), None, cfg, tmp_path, progress=False, time_limit=8.0,
                  end_within_time_limit=end_within)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    if end_within:  # the cosine decays over what the limit leaves, and the run ends complete
        assert done and log[-1]["time_budget"] < 5.0 and log[-1]["lr"] < 0.2 * cfg.lr
    else:  # stopped mid-schedule, for a rerun to resume
        assert not done and "time_budget" not in log[-1] and log[-1]["lr"] > 0.1 * cfg.lr


def test_a_budget_shrunk_by_a_limit_that_leaves_no_room_ends_the_run_and_is_logged_as_no_less_than_trained(
        tmp_path, clock):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=1, time_budget=30.0, augment=NO_AUG)
    _, done = fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False, time_limit=0.35,
                  end_within_time_limit=True)
    log = read_log(tmp_path / "log.jsonl")
    assert done and len(log) == 1 and log[0]["time_budget"] == log[0]["trained_seconds"]


def test_a_budget_an_epoch_overran_is_not_raised_to_what_was_trained_by_a_limit_that_leaves_no_room(tmp_path, clock):
    cfg = TrainConfig(epochs=10_000, batch_size=4, warmup_epochs=1, time_budget=0.05, augment=NO_AUG)
    _, done = fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False, time_limit=0.35,
                  end_within_time_limit=True)
    log = read_log(tmp_path / "log.jsonl")  # the one epoch trained 0.3 s of a 0.05 s budget
    assert done and len(log) == 1 and log[0]["trained_seconds"] > 0.05 and "time_budget" not in log[0]


def test_the_epoch_a_budget_shrunk_to_the_time_limit_ends_is_scored_and_saved(tmp_path, clock):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=1, time_budget=100.0, augment=NO_AUG)
    data = colour_set(8)
    _, done = fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False, time_limit=4.6,
                  end_within_time_limit=True, save_every=1000)
    log = read_log(tmp_path / "log.jsonl")  # the epoch the shrunk budget ends is the run's last: scored and saved
    assert done and "val_top1" in log[-1]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == log[-1]["epoch"]


def test_a_run_the_time_limit_stops_saved_the_epoch_it_stops_after(tmp_path, clock):
    cfg = TrainConfig(epochs=100, batch_size=8, augment=NO_AUG)
    _, done = fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False, time_limit=2.3,
                  save_every=1000)
    log = read_log(tmp_path / "log.jsonl")  # the stop is decided on the clock reading the epoch's end saved by,
    assert not done                          # so a rerun resumes from the epoch it stopped after
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == log[-1]["epoch"]


def test_a_resumed_run_decays_the_budgets_rate_through_its_first_epoch_as_an_unbroken_run(tmp_path, monkeypatch,
                                                                                         rates):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=1, time_budget=6.0, augment=NO_AUG)

    fit_on_fake_clock(cfg, tmp_path / "a", monkeypatch)
    straight = dict(rates)
    assert not fit_on_fake_clock(cfg, tmp_path / "b", monkeypatch, time_limit=2.0)  # stops after epoch 3: steps 0-8
    rates.clear()
    fit_on_fake_clock(cfg, tmp_path / "b", monkeypatch)
    # approx: the resumed run's fake clock readings differ from the unbroken run's in the last bit
    assert [rates[s] for s in (9, 10, 11)] == pytest.approx([straight[s] for s in (9, 10, 11)], rel=1e-12)


@pytest.mark.parametrize("resumed", [False, True])
def test_a_warmup_a_shrinking_budget_cuts_mid_way_does_not_leap_to_the_peak(tmp_path, monkeypatch, rates, resumed):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=4, time_budget=100.0, augment=NO_AUG)
    for time_limit, end_within in ((0.7, False), (1.2, True)) if resumed else ((1.5, True),):
        monkeypatch.setattr(quant.train, "time", FakeClock())  # 3 steps an epoch, 0.1 s a step: a 12-step warmup
        fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False, time_limit=time_limit,
            end_within_time_limit=end_within)
    lrs = [rates[s] for s in sorted(rates)]  # the budget shrinks to the time limit, cutting the warmup where it is
    assert len(lrs) > 5 and max(b - a for a, b in zip(lrs, lrs[1:])) == pytest.approx(cfg.lr / 12)  # its own rise
    assert max(lrs) < 0.6 * cfg.lr and lrs[-1] < 0.1 * cfg.lr  # it decays from where it stood


def test_a_resumed_run_rises_on_from_a_cut_warmup_as_an_unbroken_run(tmp_path, monkeypatch, rates):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=20, time_budget=4.0, augment=NO_AUG)

    fit_on_fake_clock(cfg, tmp_path / "a", monkeypatch)
    straight = dict(rates)
    assert not fit_on_fake_clock(cfg, tmp_path / "b", monkeypatch, time_limit=1.0)  # the 60-step warmup cut to 20 after epoch 1, stopped at step 6
    rates.clear()
    fit_on_fake_clock(cfg, tmp_path / "b", monkeypatch)
    assert min(rates) == 6 and straight[6] < 0.5 * cfg.lr
    assert [rates[s] for s in (6, 7, 8)] == pytest.approx([straight[s] for s in (6, 7, 8)], rel=1e-12)


def test_a_run_whose_loss_turns_nan_stops_with_a_message_and_saves_no_weights(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e30, warmup_epochs=0, augment=NO_AUG)
    with pytest.raises(ValueError, match=f"training diverged in epoch 1 .*other than {tmp_path} with a lower --lr$"):  # no teacher
        fit(VisionTransformer(TINY), colour_set(8), colour_set(2), cfg, tmp_path, progress=False)
    assert not (tmp_path / "last.pt").exists()


def test_a_last_step_that_leaves_nan_weights_is_caught_as_divergence_not_blamed_on_the_model(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=24, warmup_epochs=0, augment=NO_AUG, grad_clip=0.0)  # 1 step an epoch
    model = VisionTransformer(TINY)
    model.head.bias.register_hook(lambda g: torch.full_like(g, float("nan")))  # the first step's update: NaN
    with pytest.raises(ValueError, match="training diverged in epoch 1 .*lower --lr"):
        fit(model, colour_set(8), colour_set(2), cfg, tmp_path, progress=False)


@pytest.mark.parametrize("distill", ["hard", "soft"])
def test_distilling_from_a_teacher_with_nan_logits_stops_as_divergence_naming_the_teacher(tmp_path, distill):
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_epochs=0, augment=NO_AUG, distill=distill)
    teacher = VisionTransformer(TINY)
    torch.nn.init.constant_(teacher.head.bias, float("nan"))  # hard distillation trained on class 0 without a word
    with pytest.raises(ValueError, match="training diverged in epoch 1 .*the teacher's logits"):
        fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, teacher=teacher, progress=False)


@pytest.mark.parametrize("field, value", [("epochs", 0), ("grad_clip", -1.0), ("grad_clip", float("nan")),
                                          ("distill_weight", 1.5), ("distill_weight", -0.5), ("min_lr", -1e-3),
                                          ("weight_decay", -1.0), ("warmup_epochs", float("nan"))])
def test_a_training_setting_that_trains_garbage_is_refused_when_the_config_is_built(field, value):
    # epochs 0 returned the untrained model as done; a negative grad_clip flipped every gradient (the loss
    # climbed, val top-1 fell to 0); a distillation weight over 1 weighed the labels negatively; a negative
    # min_lr decayed the rate below 0 (the loss climbed again), a negative weight decay grew the weights, a NaN
    # warmup failed with "cannot convert float NaN to integer"
    with pytest.raises(ValueError, match=rf"TrainConfig {field} must be .*, got {value}$"):
        TrainConfig(**{field: value})


def test_a_negative_time_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match="time budget must be positive"):
        fit(VisionTransformer(TINY), colour_set(8), None, TrainConfig(time_budget=-5), tmp_path)


def test_a_spent_time_budget_survives_a_rerun(tmp_path):
    cfg = TrainConfig(epochs=10_000, batch_size=8, time_budget=0.3, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    log = (tmp_path / "log.jsonl").read_text()
    _, done = fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    assert done and (tmp_path / "log.jsonl").read_text() == log


def test_save_every_scores_val_and_saves_every_n_epochs_and_after_the_last(tmp_path):
    data = colour_set(8)
    fit(VisionTransformer(TINY), data, data, TrainConfig(epochs=5, batch_size=8, augment=NO_AUG), tmp_path,
        progress=False, save_every=2)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val_top1" in r] == [2, 4, 5]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 5


def test_resume_drops_the_logged_epochs_after_the_checkpoint(tmp_path, monkeypatch):
    data = colour_set(8)
    cfg = TrainConfig(epochs=5, batch_size=8, augment=NO_AUG)
    real_evaluate = __import__("quant.train", fromlist=["evaluate"]).evaluate
    calls = {"n": 0}

    def evaluate_then_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed scoring epoch 4: epochs 1-3 logged, epoch 2 saved
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr("quant.train.evaluate", evaluate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False, save_every=2)
    monkeypatch.setattr("quant.train.evaluate", real_evaluate)
    fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False, save_every=2)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5]


def test_a_resumed_run_interrupted_while_trimming_its_log_keeps_the_log_whole(tmp_path, monkeypatch):
    data = colour_set(8)
    cfg = TrainConfig(epochs=2, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False, save_every=2)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**state, "epoch": 1}, tmp_path / "last.pt")  # as if killed after logging epoch 2, before saving it
    log = (tmp_path / "log.jsonl").read_text()

    def half(self, text, **kwargs):  # Ctrl-C midway through the write
        with open(self, "w") as f:
            f.write(text[:10])
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(KeyboardInterrupt):
        fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False, save_every=2)
    assert (tmp_path / "log.jsonl").read_text() == log and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.pt", "log.jsonl"]


def _ddp_worker(rank: int, world: int, port: int, out: str, cfg: TrainConfig):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different initial weights: DDP must start every process from rank 0's
    model, done = fit(VisionTransformer(TINY), colour_set(8), None, cfg, out, progress=False, device="cpu")
    torch.save({"done": done, "params": dict(model.named_parameters()), "next_draws": torch.rand(4)},
               f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _run_two_processes(worker, out, cfg: TrainConfig) -> tuple[dict, dict]:
    """`worker(rank, 2, port, out, cfg)` in two processes on a free local port; what each saved."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(2, port, str(out), cfg), nprocs=2)
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))


@pytest.mark.timeout(120)  # processes that disagree on when to stop wait for each other forever
def test_two_processes_under_a_time_budget_stop_together_with_the_same_weights(tmp_path):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=1, time_budget=1.0, augment=NO_AUG)
    a, b = _run_two_processes(_ddp_worker, tmp_path, cfg)
    assert a["done"] and b["done"]
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) > 1 and log[-1]["trained_seconds"] >= 1.0
    assert not torch.equal(a["next_draws"], b["next_draws"])  # each process augments with its own draws


def _ddp_resume_worker(rank: int, world: int, port: int, out: str, cfg: TrainConfig, time_limit: float | None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    quant.train.time = FakeClock()
    torch.manual_seed(0)
    model, done = fit(VisionTransformer(TINY), colour_set(8), None, cfg, out, progress=False, device="cpu",
                      time_limit=time_limit)
    torch.save({"done": done, "params": dict(model.named_parameters())}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _ddp_stopped_worker(rank: int, world: int, port: int, out: str, cfg: TrainConfig):
    _ddp_resume_worker(rank, world, port, out, cfg, time_limit=0.5)  # stops after epoch 1 on the fake clock


def _ddp_unlimited_worker(rank: int, world: int, port: int, out: str, cfg: TrainConfig):
    _ddp_resume_worker(rank, world, port, out, cfg, time_limit=None)


@pytest.mark.timeout(180)
def test_two_processes_stopped_and_resumed_end_with_the_weights_of_an_unbroken_run(tmp_path):
    """Every process's augmentation draws are kept in the resume state, not rank 0's only."""
    cfg = TrainConfig(epochs=3, batch_size=8, warmup_epochs=0.5, augment=AugmentConfig(mixup_alpha=0.2))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight, _ = _run_two_processes(_ddp_unlimited_worker, tmp_path / "a", cfg)
    stopped, _ = _run_two_processes(_ddp_stopped_worker, tmp_path / "b", cfg)
    assert not stopped["done"] and len(read_log(tmp_path / "b" / "log.jsonl")) == 1
    resumed, _ = _run_two_processes(_ddp_unlimited_worker, tmp_path / "b", cfg)
    assert resumed["done"]
    assert all(torch.equal(straight["params"][k], resumed["params"][k]) for k in straight["params"])


@pytest.mark.timeout(120)
def test_two_processes_train_with_the_largest_seed_the_cli_takes(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, augment=NO_AUG, seed=2**32 - 1)  # rank 1's seed + 1 is past numpy's
    a, b = _run_two_processes(_ddp_worker, tmp_path, cfg)
    assert a["done"] and b["done"]


def _ddp_rank_loss_worker(rank: int, world: int, port: int, out: str, cfg: TrainConfig):
    quant.train.soft_cross_entropy = lambda logits, target: logits.sum() * 0 + rank  # 0 on rank 0, 1 on rank 1
    _ddp_worker(rank, world, port, out, cfg)


@pytest.mark.timeout(120)
def test_two_processes_log_the_loss_of_both_processes_batches_not_rank_0s_alone(tmp_path):
    _run_two_processes(_ddp_rank_loss_worker, tmp_path, TrainConfig(epochs=1, batch_size=8, augment=NO_AUG))
    assert read_log(tmp_path / "log.jsonl")[0]["train_loss"] == 0.5


class _RankClock(FakeClock):
    """A FakeClock ticking `tick` seconds a reading: processes whose epochs take different times."""

    def __init__(self, tick: float):
        super().__init__()
        self.tick = tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def _ddp_limit_worker(rank: int, world: int, port: int, out: str, cfg: TrainConfig):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    quant.train.time = _RankClock(0.1 if rank == 0 else 0.13)  # rank 1's epochs take longer
    model, done = fit(VisionTransformer(TINY), colour_set(8), None, cfg, out, progress=False, device="cpu",
                      time_limit=8.0, end_within_time_limit=True)
    torch.save({"done": done, "params": dict(model.named_parameters())}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)  # processes that disagree on the budget stop at different epochs and wait forever
def test_two_processes_shrinking_the_budget_to_the_time_limit_agree_on_it(tmp_path):
    cfg = TrainConfig(epochs=10_000, batch_size=8, warmup_epochs=1, time_budget=100.0, augment=NO_AUG)
    a, b = _run_two_processes(_ddp_limit_worker, tmp_path, cfg)
    assert a["done"] and b["done"]
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


def as_rank(monkeypatch, rank: int, sends=lambda rank, obj: obj):
    """This process as rank `rank` of torchrun's 2, its process group joined; what the processes exchange
    (`_Dist.gather`) is `sends(r, this process's object)` from each rank r."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as torchrun's process group, joined

    def all_gather_object(objs, obj):
        objs[:] = [sends(r, obj) for r in range(len(objs))]
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)


def test_a_batch_size_that_does_not_divide_among_the_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # batch 5 trained batches of 4, two images a process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as torchrun's process group, joined
    with pytest.raises(ValueError, match="batch size 5 does not divide among 2 processes; give a multiple of 2"):
        fit(VisionTransformer(TINY), colour_set(8), None, TrainConfig(epochs=1, batch_size=5), tmp_path,
            progress=False, device="cpu")


def test_a_batch_size_the_processes_do_not_divide_is_refused_saying_how_to_resume_a_run_that_keeps_it():
    with pytest.raises(ValueError, match=r"give a multiple of 4 \(to resume a run, which keeps its batch size, start a "
                                         r"number of processes that divides it\)$"):  # a run of batch 6 resumed by 4
        quant.train.per_process_batch(6, 4)  # processes: the multiple of 4 it was told to give was another config


def test_cli_refuses_a_batch_size_that_does_not_divide_among_the_processes_before_decoding_the_data(
        tmp_path, image_tree, monkeypatch):
    as_rank(monkeypatch, 0)
    monkeypatch.setattr(quant.train, "load_split", lambda *a, **k: pytest.fail("the data was decoded first"))
    with pytest.raises(ValueError, match="batch size 5 does not divide among 2 processes; give a multiple of 2"):
        main(["--data", str(image_tree), "--out", str(tmp_path / "run"), "--batch-size", "5"])


@pytest.mark.parametrize("rank, said", [(0, True), (1, False)])
def test_cli_under_torchrun_prints_an_error_every_process_hits_once_from_rank_0(tmp_path, capsys, monkeypatch, rank,
                                                                                said):
    as_rank(monkeypatch, rank)  # each process printed it
    try:
        code = run(main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--batch-size", "4"],
                   several_processes=True)
    except SystemExit as e:  # (as the process exits)
        code = e.code
    assert code == 2
    assert capsys.readouterr().err == (f"error: data path does not exist: {tmp_path / 'none'}\n" if said else "")


def test_cli_under_torchrun_a_process_that_fails_where_rank_0_does_not_prints_its_own_error(tmp_path, capsys,
                                                                                            monkeypatch):
    as_rank(monkeypatch, 1, sends=lambda r, error: error if r else None)  # rank 0 found the data: this machine has none
    assert run(main, ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--batch-size", "4"],
               several_processes=True) == 2
    assert capsys.readouterr().err == f"error: data path does not exist: {tmp_path / 'none'}\n"


def test_under_torchrun_an_error_every_process_of_another_machine_hits_is_printed_once(monkeypatch):
    as_rank(monkeypatch, 2, sends=lambda r, error: error if r else None)  # ranks 1 and 2, a machine without the data
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as e:  # rank 1 says why
        quant.train._Dist("cpu").settle(ValueError("data path does not exist: /data"))
    assert e.value.code == 2


def test_under_torchrun_a_damaged_log_rank_0_finds_on_resume_ends_the_other_processes_before_training(tmp_path,
                                                                                                      monkeypatch):
    data, cfg = colour_set(8), TrainConfig(epochs=2, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False)
    as_rank(monkeypatch, 1, sends=lambda r, error: error if r else f"{tmp_path / 'log.jsonl'}, line 1, is not an "
                                                                   f"epoch record")
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda *a, **k: pytest.fail(
        "rank 1 went on to train, where gloo's traceback ended it as rank 0 ended"))
    with pytest.raises(SystemExit) as e:  # silently: rank 0 says why
        fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False, device="cpu")
    assert e.value.code == 2


def test_under_torchrun_processes_that_find_other_resume_states_are_refused_not_left_waiting(tmp_path, monkeypatch):
    data, cfg = colour_set(8), TrainConfig(epochs=2, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False)
    as_rank(monkeypatch, 0, sends=lambda r, obj: 0 if r and isinstance(obj, int) else obj)  # another machine's own
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda *a, **k: pytest.fail(  # run folder
        "the processes went on to train from other epochs, where they waited for each other till torchrun's timeout"))
    with pytest.raises(ValueError, match=r"processes found other resume states in .*: epochs done 2, 0 by rank; give "
                                         r"every machine of the run the same run folder"):
        fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False, device="cpu")


def test_under_torchrun_a_run_whose_loss_turns_nan_is_named_by_rank_0_only(tmp_path, monkeypatch):
    as_rank(monkeypatch, 1)  # every process printed it
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, **kwargs: model)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None: None)  # (sums: this process's)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e30, warmup_epochs=0, augment=NO_AUG)
    with pytest.raises(SystemExit) as e:
        fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False, device="cpu")
    assert e.value.code == 2


@pytest.mark.parametrize("world", ["", "0"])  # 0: $((SLURM_NTASKS)), a ZeroDivisionError dividing the batch
def test_a_run_trains_in_one_process_where_world_size_is_set_empty(monkeypatch, world):
    monkeypatch.setenv("WORLD_SIZE", world)  # export WORLD_SIZE=$SLURM_NTASKS, that one unset
    assert quant.train._Dist("cpu").world == 1


@pytest.mark.parametrize("rank", ["", "1"])
def test_a_run_in_one_process_is_rank_0_and_takes_the_first_gpu_whatever_rank_is_set_to(monkeypatch, rank):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # RANK=$SLURM_PROCID exported, that one unset: int('') failed;
    monkeypatch.setenv("RANK", rank)                 # set to 1, the run logged and saved nothing
    monkeypatch.setenv("LOCAL_RANK", rank)
    assert quant.train._Dist("cpu").rank == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert quant.train.resolve_device(None) == torch.device("cuda:0")


def test_a_gpu_named_by_its_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc-per-node 2 ... --device cuda:0: both on GPU 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device 'cuda:0' puts every process torchrun starts here on one GPU; "
                                         r"give cuda \(each process takes its own, LOCAL_RANK\)"):
        quant.train._Dist("cuda:0")


def test_more_processes_than_gpus_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun --nproc-per-node 2 on a machine of one GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"torchrun started more processes on this machine than its 1 CUDA "
                                         r"device; give --nproc-per-node 1 at most"):
        quant.train.resolve_device(None)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=2, batch_size=16, warmup_epochs=0.5,
                      augment=AugmentConfig(mixup_alpha=0.2, label_smoothing=0.1))
    data = colour_set(16)

    def run(out):
        torch.manual_seed(0)
        return fit(VisionTransformer(TINY), data, data, cfg, out, progress=False)[0].state_dict()
    straight = run(tmp_path / "a")

    calls = {"n": 0}
    real_evaluate = __import__("quant.train", fromlist=["evaluate"]).evaluate

    def evaluate_then_crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during epoch 2, after epoch 1's checkpoint
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr("quant.train.evaluate", evaluate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr("quant.train.evaluate", real_evaluate)
    resumed = run(tmp_path / "b")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_run_resumed_by_another_number_of_processes_says_so_and_keeps_the_global_batch(tmp_path, capsys):
    data, cfg = colour_set(8), TrainConfig(epochs=1, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), data, None, cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["rank_rngs"] = [{"rng": state["rng"]}] * 2  # as torchrun's 2 processes saved it: it resumed without a word
    torch.save(state, tmp_path / "last.pt")
    capsys.readouterr()
    assert fit(VisionTransformer(TINY), data, None, cfg, tmp_path, progress=False)[1]
    assert f"{tmp_path / 'last.pt'} was saved by 2 process(es), this run has 1: it trains on with the same global " \
           f"batch of 8 images, from other augmentation draws than an unbroken run" in capsys.readouterr().out


def test_a_run_of_one_process_resumed_by_two_says_so(tmp_path, capsys, monkeypatch):
    data, cfg = colour_set(8), TrainConfig(epochs=1, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), data, None, cfg, tmp_path, progress=False)  # its streams kept as one process's
    as_rank(monkeypatch, 0)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, **kwargs: model)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None: None)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    capsys.readouterr()
    assert fit(VisionTransformer(TINY), data, None, cfg, tmp_path, progress=False, device="cpu")[1]
    assert f"{tmp_path / 'last.pt'} was saved by 1 process(es), this run has 2" in capsys.readouterr().out


def test_under_torchrun_a_log_rank_0_cannot_remove_ends_the_other_processes_before_training(tmp_path, monkeypatch):
    (tmp_path / "log.jsonl").mkdir()  # an OSError of rank 0 alone, as a fresh run starts
    told = []
    as_rank(monkeypatch, 0, sends=lambda r, error: told.append(error) or error)
    with pytest.raises(OSError):
        fit(VisionTransformer(TINY), colour_set(8), None, TrainConfig(epochs=1, batch_size=8, augment=NO_AUG),
            tmp_path, progress=False, device="cpu")
    assert told and told[0] is not None  # the other processes learn of it (else they wait in the next collective)


def test_resuming_with_another_config_is_refused_naming_what_changed(tmp_path):
    data = colour_set(8)
    fit(VisionTransformer(TINY), data, None, TrainConfig(epochs=1, batch_size=8, augment=NO_AUG), tmp_path,
        progress=False)
    with pytest.raises(ValueError, match=r"another config \(epochs 1 -> 2\)"):
        fit(VisionTransformer(TINY), data, None, TrainConfig(epochs=2, batch_size=8, augment=NO_AUG),
            tmp_path, progress=False)


def test_resuming_a_run_of_another_model_is_refused(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    wider = VisionTransformer(dataclasses.replace(TINY, embed_dim=48))
    with pytest.raises(ValueError, match="written by a run with other model config.*; use another run folder or delete it$"):
        fit(wider, colour_set(8), None, cfg, tmp_path, progress=False)


def test_resuming_on_other_training_images_is_refused(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, dataclasses.replace(cfg, epochs=1), tmp_path, progress=False)
    (tmp_path / "log.jsonl").unlink()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state["config"] = json.dumps(cfg.to_dict(), sort_keys=True)   # as if stopped after epoch 1 of 2
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="written by a run with other training images"):
        fit(VisionTransformer(TINY), colour_set(8, seed=1), None, cfg, tmp_path, progress=False)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)  # the same images resume


def test_resuming_with_another_teacher_is_refused(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, distill="hard", augment=NO_AUG)
    torch.manual_seed(1)
    teacher, other = VisionTransformer(TINY), VisionTransformer(TINY)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, teacher=teacher, progress=False)
    with pytest.raises(ValueError, match="written by a run with other teacher"):
        fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, teacher=other, progress=False)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, teacher=teacher, progress=False)


def test_a_fresh_run_in_a_used_folder_starts_its_own_log(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    (tmp_path / "last.pt").unlink()   # as the refusal of a changed config advises
    fit(VisionTransformer(TINY), colour_set(8), None, dataclasses.replace(cfg, lr=1e-4), tmp_path, progress=False)
    assert [r["epoch"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2]


def test_a_warmup_longer_than_the_run_is_cut_to_half_of_it_so_the_rate_still_decays(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=8, warmup_epochs=5, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    lrs = [r["lr"] for r in read_log(tmp_path / "log.jsonl")]   # at each epoch's end: the peak, then decayed
    assert lrs[0] == pytest.approx(cfg.lr) and lrs[1] < 0.5 * cfg.lr


def test_a_warmup_of_more_epochs_than_a_float_counts_in_steps_is_cut_like_any_long_warmup(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=4, warmup_epochs=1e308, augment=NO_AUG)  # steps x epochs: infinite
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    lrs = [r["lr"] for r in read_log(tmp_path / "log.jsonl")]
    assert lrs[0] == pytest.approx(cfg.lr) and lrs[1] < 0.5 * cfg.lr


@pytest.mark.parametrize("content", [b"", b"\x00garbage"])
def test_a_damaged_resume_state_is_refused_with_a_message(tmp_path, content):
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(ValueError, match="not a readable resume state"):
        fit(VisionTransformer(TINY), colour_set(8), None, TrainConfig(epochs=1, batch_size=8), tmp_path)


def test_a_foreign_resume_state_is_refused_with_a_message(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="not a bitvit resume state"):
        fit(VisionTransformer(TINY), colour_set(8), None, TrainConfig(epochs=1, batch_size=8), tmp_path)


@pytest.mark.parametrize("field, value", [("rng", torch.zeros(3)), ("epoch", -1), ("epoch", 9),
                                          ("trained_seconds", float("inf")), ("warmup_seconds", float("nan"))])
def test_a_resume_state_with_a_damaged_field_is_refused_with_a_message(tmp_path, field, value):
    cfg = TrainConfig(epochs=1, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), colour_set(8), cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**state, field: value}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="holds a damaged resume state"):
        fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)


@pytest.mark.parametrize("record", ["", "{not json", '{"loss": 1.0, "seconds": 1.0}', '{"epoch": 3}'],
                         ids=["blank", "garbage", "no-epoch", "no-seconds"])
def test_a_resumed_run_skips_blank_log_lines_and_names_a_damaged_log(tmp_path, record):
    data = colour_set(8)
    cfg = TrainConfig(epochs=2, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False)  # 2 epochs logged, epoch 2 saved
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(record + "\n")
    if record:
        with pytest.raises(ValueError, match=r"log.jsonl, line 3, is not an epoch record"):
            fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False)
    else:
        assert fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False)[1]


def test_a_resumed_run_drops_a_last_log_line_cut_short_as_it_was_written_with_a_note(tmp_path, capsys):
    data = colour_set(8)
    cfg = TrainConfig(epochs=2, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False)  # 2 epochs logged, epoch 2 saved
    log = (tmp_path / "log.jsonl").read_text()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # killed (or out of disk) while logging an epoch after the saved one
    assert fit(VisionTransformer(TINY), data, data, cfg, tmp_path, progress=False)[1]
    assert (tmp_path / "log.jsonl").read_text() == log
    assert f"{tmp_path / 'log.jsonl'}: dropping its last line" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["model.safetensors", "last.pt", "log.jsonl", "curves.png"])
def test_a_folder_where_the_run_writes_a_file_is_refused_before_the_data_is_read(tmp_path, capsys, name):
    (tmp_path / "run" / name).mkdir(parents=True)
    assert run(main, ["--data", str(tmp_path / "no-data-here"), "--out", str(tmp_path / "run")]) == 2
    assert f"run/{name} is a folder, where the run writes its {name}" in capsys.readouterr().err


def test_an_out_path_that_is_a_file_is_refused_before_the_data_is_read(tmp_path, capsys):
    (tmp_path / "run").write_text("")
    assert run(main, ["--data", str(tmp_path / "no-data-here"), "--out", str(tmp_path / "run")]) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err


def test_time_limit_stops_at_an_epoch_boundary_and_a_rerun_finishes(tmp_path):
    data = colour_set(8)
    cfg = TrainConfig(epochs=3, batch_size=8, augment=NO_AUG)
    _, done = fit(VisionTransformer(TINY), data, None, cfg, tmp_path, progress=False, time_limit=0)
    assert not done and not (tmp_path / "last.pt").exists()
    _, done = fit(VisionTransformer(TINY), data, None, cfg, tmp_path, progress=False)
    assert done and len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


def test_distillation_needs_a_teacher(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(VisionTransformer(TINY), colour_set(8), None, TrainConfig(distill="hard"), tmp_path)


def logits(seed: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(seed)) * 3


def test_soft_cross_entropy_is_the_batch_mean_cross_entropy_against_probabilities():
    target = logits(1).softmax(-1)
    want = -(target * logits(0).log_softmax(-1)).sum(-1).mean()
    assert soft_cross_entropy(logits(0), target).item() == pytest.approx(want.item(), rel=1e-6)


def test_hard_distillation_is_cross_entropy_with_the_teachers_top_class():
    want = F.cross_entropy(logits(0), logits(1).argmax(-1))
    assert distill_loss(logits(0), logits(1), "hard").item() == pytest.approx(want.item(), rel=1e-6)


def test_hard_distillation_from_a_teacher_with_nan_logits_for_one_image_only_gives_a_nan_loss():
    teacher = logits(1)
    teacher[2, 3] = float("nan")  # one image of four: its target would be class 3, the NaN's, without a word
    assert distill_loss(logits(0), teacher, "hard").isnan()


def test_soft_distillation_is_the_batch_mean_kl_from_the_teacher_at_temperature_times_its_square():
    p_teacher, log_p_student = (logits(1) / 2).softmax(-1), (logits(0) / 2).log_softmax(-1)
    want = 4 * (p_teacher * (p_teacher.log() - log_p_student)).sum(-1).mean()
    assert distill_loss(logits(0), logits(1), "soft", temperature=2.0).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("loss", [lambda s, t: distill_loss(s, t, "hard"), lambda s, t: distill_loss(s, t, "soft"),
                                  lambda s, t: soft_cross_entropy(s, t.softmax(-1))], ids=["hard", "soft", "targets"])
@pytest.mark.parametrize("target", [logits(1)[:, :3], logits(1)[:, :1], logits(1)[:1]],
                         ids=["fewer-classes", "one-class", "one-image"])
def test_logits_and_targets_of_different_shapes_are_refused(loss, target):
    with pytest.raises(ValueError, match=r"do not match the student's logits \(4, 5\)"):  # they broadcast or
        loss(logits(0), target)                                      # took the argmax of 3 classes silently


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_a_soft_distillation_temperature_that_is_not_positive_and_finite_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):  # it gave NaN or a loss
        distill_loss(logits(0), logits(1), "soft", temperature)


def test_an_unknown_distillation_kind_is_refused():
    with pytest.raises(ValueError, match="unknown distillation kind 'feature'"):
        distill_loss(logits(0), logits(1), "feature")


def test_cli_trains_and_saves_a_loadable_model(tmp_path, image_tree, capsys):
    from quant.models import load_model
    main(["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
          "--epochs", "1", "--batch-size", "4", "--limit", "12"])
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.config.classes == TINY.classes and model.config.num_classes == 3
    assert "saved" in capsys.readouterr().out


def test_cli_says_at_what_size_the_model_sees_the_images(tmp_path, image_tree, capsys, monkeypatch):
    monkeypatch.setitem(quant.models.CONFIGS, "vit_cifar_tiny", dataclasses.replace(TINY, img_size=24))
    main(["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
          "--epochs", "1", "--batch-size", "4", "--limit", "8"])  # the tree's files are 16x16
    assert ", seen at 24x24 pixels (shorter side resized to 24, then centre-cropped)\n" in capsys.readouterr().out


def test_the_plot_of_a_one_epoch_run_on_one_image_titles_it_in_the_singular(tmp_path, image_tree, monkeypatch):
    drawn = []
    monkeypatch.setattr(quant.train, "write_png", lambda path, fig, dpi: drawn.append(fig))
    main(["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
          "--epochs", "1", "--batch-size", "1", "--limit", "1"])
    assert drawn[0].get_suptitle() == "vit_cifar_tiny: 1 epoch of 1 train image"


def test_cli_plots_the_runs_loss_and_accuracy_per_epoch_beside_the_model(tmp_path, image_tree, capsys, monkeypatch):
    drawn = []  # the figures, as write_png is handed them
    monkeypatch.setattr(quant.train, "write_png", lambda path, fig, dpi: drawn.append((path, fig))
                        or fig.savefig(path, format="png"))
    main(["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
          "--epochs", "2", "--batch-size", "4", "--limit", "12"])
    (path, fig), = drawn
    assert path == tmp_path / "run" / "curves.png" and path.read_bytes()[:4] == b"\x89PNG"
    loss, acc = fig.axes
    assert [len(line.get_xdata()) for line in loss.lines + acc.lines] == [2, 2, 2]  # loss; training acc, val top-1
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("epoch", "training loss (cross-entropy)")
    assert (acc.get_xlabel(), acc.get_ylabel()) == ("epoch", "accuracy (fraction right)")
    assert all(float(t).is_integer() for ax in (loss, acc) for t in ax.get_xticks())  # epochs 1 and 2, no 1.2
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["training (augmented batches)", "val top-1"]
    assert f"curves: {path}" in capsys.readouterr().out


def test_cli_rerun_of_a_run_keeps_the_training_seconds_of_all_its_epochs_in_the_model_file(tmp_path, image_tree,
                                                                                            clock):
    from safetensors import safe_open
    run_dir = tmp_path / "run"
    argv = ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(run_dir), "--epochs", "3",
            "--batch-size", "4", "--limit", "12"]
    seconds = []
    for _ in range(2):  # the rerun resumes after the last epoch: it trains none, and keeps the run's seconds
        main(argv)
        with safe_open(run_dir / "model.safetensors", "pt") as f:
            seconds.append(f.metadata()["train_seconds"])
    assert seconds == [f"{sum(r['seconds'] for r in read_log(run_dir / 'log.jsonl')):.0f}"] * 2 != ["0"] * 2


def test_cli_whose_resume_state_the_disk_has_no_room_for_ends_with_one_line_naming_it(tmp_path, image_tree, capsys,
                                                                                       monkeypatch):
    def full(obj, f, *args, **kwargs):  # as torch's zip writer reports the failed write of a full disk
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", full)
    run_dir = tmp_path / "run"
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(run_dir),
                      "--epochs", "1", "--batch-size", "4", "--limit", "12"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: [Errno 28] No space left on device: '{run_dir / 'last.pt'}'"
    assert sorted(p.name for p in run_dir.iterdir()) == ["log.jsonl"]


def test_cli_whose_log_the_disk_has_no_room_for_ends_with_one_line_naming_it(tmp_path, image_tree, capsys,
                                                                              monkeypatch):
    def full_log(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if Path(path).name == "log.jsonl" and "a" in mode:
            def write(text):
                raise OSError(errno.ENOSPC, "No space left on device")  # a write's own error names no file
            f.write = write
        return f
    monkeypatch.setattr(quant.train, "open", full_log, raising=False)
    run_dir = tmp_path / "run"
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(run_dir),
                      "--epochs", "1", "--batch-size", "4", "--limit", "12"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: [Errno 28] No space left on device: '{run_dir / 'log.jsonl'}'"


def test_cli_refuses_a_run_folder_another_run_is_training_in(tmp_path, image_tree, capsys):
    from quant.cli import run_lock
    argv = ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"), "--epochs", "1",
            "--batch-size", "4", "--limit", "12"]
    with run_lock(tmp_path / "run"):  # as the other run holds it
        assert run(main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'run'} is the run folder of another run still going; let it end, or use another run folder"
    assert list((tmp_path / "run").iterdir()) == []
    assert run(main, argv) == 0 and (tmp_path / "run" / "model.safetensors").exists()  # once it has ended


def test_cli_holds_its_run_folder_until_its_model_file_is_written(tmp_path, image_tree, monkeypatch):
    import quant.models
    from quant.cli import run_lock
    save_model, run_dir = quant.models.save_model, tmp_path / "run"

    def save_unless_let_in(*args, **kwargs):  # as a rerun given the folder while this run writes its model file
        with pytest.raises(ValueError, match="the run folder of another run still going"), run_lock(run_dir):
            pass
        save_model(*args, **kwargs)
    monkeypatch.setattr(quant.models, "save_model", save_unless_let_in)
    main(["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(run_dir), "--epochs", "1",
          "--batch-size", "4", "--limit", "12"])
    assert (run_dir / "model.safetensors").exists()


def torchrun(args: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m quant.train ARGS` on one CPU thread a process; the processes
    are killed at `timeout` seconds (a hang fails the test, not CI)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "quant.train", "--threads", "1", *args], cwd=Path(__file__).parents[1],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="kills the process group at the timeout")
def test_torchrun_with_two_processes_trains_saves_once_and_resumes(tmp_path, image_tree):
    run_dir = tmp_path / "run"
    args = ["--data", str(image_tree), "--out", str(run_dir), "--epochs", "2", "--batch-size", "4"]
    r = torchrun(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir()) == ["curves.png", "last.pt", "log.jsonl", "model.safetensors"]
    assert [rec["epoch"] for rec in read_log(run_dir / "log.jsonl")] == [1, 2]  # rank 0 logs, once an epoch
    assert r.stdout.count(f"saved {run_dir / 'model.safetensors'}\n") == 1
    assert len(re.findall(r"evaluating: +0%", r.stderr)) == 2  # rank 0's bar scoring val after each epoch, only
    r = torchrun(args)  # every process resumes from rank 0's state
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("resuming from") == 1 and [rec["epoch"] for rec in read_log(run_dir / "log.jsonl")] == [1, 2]
    from quant.cli import run_lock
    with run_lock(run_dir):  # as another run holds it: every process ends, not only rank 0, which is refused it
        r = torchrun(args, timeout=25)
    assert r.returncode != 0 and r.stderr.count(f"error: {run_dir} is the run folder of another run still going") == 1
    log = run_dir / "log.jsonl"
    log.write_text("damaged\n" + log.read_text())  # read by rank 0 alone: rank 1 died of gloo's traceback
    r = torchrun(args, timeout=25)
    assert r.returncode != 0 and r.stderr.count("error: ") == 1 and "[rank1]" not in r.stderr
    assert f"error: {log}, line 1, is not an epoch record; fix or delete the log" in r.stderr


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_cli_under_torchrun_shows_the_decoding_progress_of_rank_0_only(tmp_path, image_tree, monkeypatch, rank, shown):
    monkeypatch.setenv("WORLD_SIZE", "2")  # every process drew its bar over the others'
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as torchrun's process group, joined
    bars = []

    def load_split(*args, progress=True, **kwargs):
        bars.append(progress)
        raise KeyboardInterrupt  # (the rest needs the process group)
    monkeypatch.setattr(quant.train, "load_split", load_split)
    with pytest.raises(KeyboardInterrupt):
        main(["--data", str(image_tree), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4"])
    assert bars == [shown]


def test_cli_refuses_a_val_folder_of_other_classes_before_training(tmp_path, capsys):
    tree = write_tree(tmp_path / "t", splits=("train",))
    write_tree(tmp_path / "t", splits=("val",), classes=TINY.classes[:2])
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(tree), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4"]) == 2
    assert "are not the train split's" in capsys.readouterr().err and not (tmp_path / "run" / "log.jsonl").exists()


def test_cli_refuses_a_tree_of_one_class_instead_of_training_a_model_that_is_always_right(tmp_path, capsys):
    tree = write_tree(tmp_path / "t", splits=("train",), classes=("cat",))
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(tree), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4"]) == 2
    assert "holds one class ('cat') in its train split" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def tiny_file(path: Path, seed: int, **overrides) -> Path:
    """A randomly initialised `vit_cifar_tiny` of the image tree's three classes, saved at `path`."""
    from quant.models import create_model, save_model
    torch.manual_seed(seed)
    save_model(create_model("vit_cifar_tiny", **{"num_classes": 3, "classes": TINY.classes, **overrides}), path)
    return path


@pytest.mark.parametrize("option, whose", [("--teacher", "the teacher"), ("--init", "the --init file")])
def test_cli_refuses_data_of_other_classes_than_a_teachers_or_init_files_before_any_image_is_decoded(
        tmp_path, capsys, no_decoding, option, whose):
    model = tiny_file(tmp_path / "m.safetensors", seed=0)
    other = write_tree(tmp_path / "other", splits=("train",), classes=("a", "b", "c"))
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(other), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4", option, str(model)]) == 2
    assert f"are not {whose} " in capsys.readouterr().err and not (tmp_path / "run" / "log.jsonl").exists()


def test_cli_refuses_a_val_folder_of_other_classes_before_any_of_its_images_is_decoded(tmp_path, capsys,
                                                                                      monkeypatch):
    tree = write_tree(tmp_path / "t", splits=("train",))
    write_tree(tmp_path / "t", splits=("val",), classes=TINY.classes[:2])
    import quant.data
    decode = quant.data._decode
    monkeypatch.setattr(quant.data, "_decode", lambda data, name, size: decode(data, name, size) if "/val/" not in name
                        else pytest.fail(f"decoded {name}"))
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(tree), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4"]) == 2
    assert "are not the train split's" in capsys.readouterr().err


def test_cli_refuses_a_teacher_of_another_image_size_naming_it(tmp_path, image_tree, capsys):
    teacher = tiny_file(tmp_path / "t64.safetensors", seed=0, img_size=64)
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4", "--limit", "12", "--teacher", str(teacher)]) == 2
    err = capsys.readouterr().err
    assert "t64.safetensors takes 64x64 images" in err and not (tmp_path / "run").exists()


def test_cli_refuses_a_mix_prob_with_mixup_and_cutmix_both_off_instead_of_ignoring_it(tmp_path, capsys):
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                      "--mixup", "0", "--cutmix", "0", "--mix-prob", "0.5"]) == 2
    assert "--mix-prob is the chance a batch is mixed" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_cli_refuses_distill_without_a_teacher_instead_of_training_undistilled(tmp_path, capsys):
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                      "--distill", "soft"]) == 2
    assert "--distill soft needs --teacher" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("given", [[], ["--time-budget", "60"], ["--time-limit", "60"]])
def test_cli_refuses_end_within_time_limit_without_a_budget_and_a_limit_instead_of_ignoring_it(tmp_path, capsys,
                                                                                              given):
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                      "--end-within-time-limit", *given]) == 2
    err = capsys.readouterr().err
    assert "--end-within-time-limit needs --time-budget and --time-limit" in err and not (tmp_path / "run").exists()


def test_cli_stopped_by_time_limit_saves_the_model_marked_incomplete(tmp_path, image_tree, capsys):
    from safetensors import safe_open
    main(["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
          "--epochs", "2", "--batch-size", "4", "--limit", "12", "--time-limit", "1e-9"])
    with safe_open(tmp_path / "run" / "model.safetensors", "pt") as f:
        assert f.metadata()["complete"] == "false"
    assert "incomplete" in capsys.readouterr().out
    assert (tmp_path / "run" / "curves.png").is_file()  # the epochs so far, beside the model so far


def test_cli_init_starts_training_from_the_files_weights(tmp_path, image_tree, monkeypatch):
    from quant.models import load_model
    start = tiny_file(tmp_path / "start.safetensors", seed=1)
    seen = {}
    def spy(model, *args, **kwargs):
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        return fit(model, *args, **kwargs)
    monkeypatch.setattr(quant.train, "fit", spy)
    main(["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
          "--epochs", "1", "--batch-size", "4", "--limit", "12", "--init", str(start)])
    for k, v in load_model(start).state_dict().items():
        assert torch.equal(seen[k], v), k


def test_cli_init_takes_a_timm_checkpoint_of_the_network_to_train(tmp_path):
    from quant.models import CIFAR10_CLASSES, create_model, load_model
    tree = write_tree(tmp_path / "cifar", classes=CIFAR10_CLASSES, per_class=2)
    torch.manual_seed(1)
    torch.save(create_model("vit_cifar_tiny").state_dict(), tmp_path / "timm.pth")   # timm's names, no config
    main(["--model", "vit_cifar_tiny", "--data", str(tree), "--out", str(tmp_path / "run"), "--epochs", "1",
          "--batch-size", "4", "--limit", "10", "--init", str(tmp_path / "timm.pth")])
    assert load_model(tmp_path / "run" / "model.safetensors").config.classes == CIFAR10_CLASSES


def test_cli_refuses_a_timm_checkpoint_of_other_classes_naming_them(tmp_path, image_tree, capsys):
    from quant.models import create_model
    torch.save(create_model("vit_cifar_tiny").state_dict(), tmp_path / "timm.pth")   # CIFAR-10's 10 classes
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4", "--init", str(tmp_path / "timm.pth")]) == 2
    assert "['cat', 'dog', 'frog'] are not the --init file" in capsys.readouterr().err


def test_resuming_with_another_init_is_refused(tmp_path, image_tree, capsys):
    args = ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--batch-size", "4", "--limit", "12", "--init"]
    main(args + [str(tiny_file(tmp_path / "a.safetensors", seed=1))])
    assert run(main, args + [str(tiny_file(tmp_path / "b.safetensors", seed=2))]) == 2
    assert "another config (init " in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    ({"embed_dim": 64}, "holds another model than the one to train: embed_dim 64 (to train: 128)"),
    ({"num_classes": 2, "classes": TINY.classes[:2]}, "['cat', 'dog', 'frog'] are not the --init file"),
])
def test_cli_refuses_an_init_file_of_another_model_naming_what_differs(tmp_path, image_tree, capsys, overrides,
                                                                        message):
    start = tiny_file(tmp_path / "start.safetensors", seed=1, **overrides)
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4", "--init", str(start)]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run" / "log.jsonl").exists()


def test_an_init_file_trained_before_class_names_were_composed_starts_a_run_on_its_tree(tmp_path):
    import unicodedata
    from quant.models import create_model
    start = tiny_file(tmp_path / "start.safetensors", seed=1,   # trained on a Mac's tree: "é" decomposed
                      classes=tuple(unicodedata.normalize("NFD", c) for c in ("café", "dog", "été")))
    model = create_model("vit_cifar_tiny", num_classes=3, classes=("café", "dog", "été"))   # the tree as now read
    quant.train.start_from(model, quant.train.init_model(str(start), "vit_cifar_tiny"), str(start))
    assert model.config.classes == ("café", "dog", "été")


def test_cli_refuses_a_quantized_init_file(tmp_path, image_tree, capsys):
    import quant
    from quant.models import load_model
    quant.save_quantized(quant.quantize(load_model(tiny_file(tmp_path / "fp.safetensors", seed=1)), "w8a8"),
                         tmp_path / "q.safetensors")
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(image_tree), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4", "--init", str(tmp_path / "q.safetensors")]) == 2
    assert "q.safetensors is a quantized model; start from a full-precision one" in capsys.readouterr().err


@pytest.mark.parametrize("teacher_budget", ["0", "1"])
def test_the_gpu_reference_script_trains_scores_and_hands_back_its_files(tmp_path, image_tree, teacher_budget):
    env = {**os.environ, "DATA": str(image_tree), "RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out"),
           "TIME_BUDGET": "1", "TEACHER_BUDGET": teacher_budget, "BATCH": "4", "PYTHON": sys.executable}
    # --epochs 1: one epoch of the ViT, whose budget the teacher's would otherwise raise to the script's 60 s floor
    r = subprocess.run(["bash", "quant/gpu_reference.sh", "--model", "vit_cifar_tiny", "--device", "cpu",
                        "--warmup-epochs", "1", "--epochs", "1"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("reference model done")
    assert sorted(os.listdir(tmp_path / "out")) == ["curves.png", "log.jsonl", "model.safetensors", "test.json",
                                                    "train.log", "val.json"]
    assert json.loads((tmp_path / "out" / "test.json").read_text())["split"] == "test"
    assert ("resnet_cifar" in (tmp_path / "out" / "train.log").read_text()) == (teacher_budget == "1")


def test_the_gpu_reference_script_in_two_parts_resumes_in_the_second_and_finishes_there(tmp_path, image_tree):
    """PART=1 trains until its time limit and keeps the resume state (no scores); PART=2, the same command
    at once, resumes from it, ends the schedule within its own limit and scores."""
    from safetensors import safe_open
    env = {**os.environ, "DATA": str(image_tree), "RUN": str(tmp_path / "run"), "TIME_BUDGET": "1000",
           "TIME_LIMIT": "1", "BATCH": "4", "PYTHON": sys.executable}
    args = ["bash", "quant/gpu_reference.sh", "--model", "vit_cifar_tiny", "--device", "cpu", "--warmup-epochs", "1"]
    run = lambda part: subprocess.run(args, cwd=Path(__file__).parents[1], capture_output=True, text=True,  # noqa: E731
                                      timeout=240, env={**env, "PART": part, "OUT": str(tmp_path / f"out{part}")})
    first = run("1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "part 1 done" in first.stdout and (tmp_path / "run" / "last.pt").exists()
    assert sorted(os.listdir(tmp_path / "out1")) == ["log.jsonl", "train.log"]
    second = run("2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming from" in (tmp_path / "out2" / "train.log").read_text()
    assert second.stdout.strip().endswith("reference model done")
    with safe_open(tmp_path / "run" / "model.safetensors", "pt") as f:
        assert f.metadata()["complete"] == "true"
    assert json.loads((tmp_path / "out2" / "test.json").read_text())["split"] == "test"


@pytest.mark.parametrize("var, value, message", [("TIME_LIMIT", "5.5", "TIME_LIMIT must be a whole number"),
                                                 ("TEACHER_BUDGET", "abc", "TEACHER_BUDGET must be a whole number"),
                                                 ("TIME_BUDGET", "0", "TIME_BUDGET must be a positive whole number"),
                                                 ("BATCH", "0", "BATCH must be a positive whole number"),
                                                 ("DATA", "/no/such/data", "no data at /no/such/data")])
def test_the_gpu_reference_script_refuses_a_bad_setting_before_any_work(tmp_path, var, value, message):
    env = {**os.environ, "RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out"), var: value}
    r = subprocess.run(["bash", "quant/gpu_reference.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a CUDA device")
def test_the_gpu_reference_script_refuses_a_machine_without_cuda_unless_a_device_is_given(tmp_path, image_tree):
    env = {**os.environ, "DATA": str(image_tree), "RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "quant/gpu_reference.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "torch sees no CUDA device" in r.stderr and "--device cpu" in r.stderr, \
        r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_the_gpu_reference_script_takes_a_device_given_with_an_equals_sign(tmp_path, image_tree):
    env = {**os.environ, "DATA": str(image_tree), "RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "quant/gpu_reference.sh", "--device=cpu", "--lr", "-1"],  # quant.train refuses --lr
                       cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=120)
    assert "torch sees no CUDA device" not in r.stderr and "--lr" in (tmp_path / "out" / "train.log").read_text(), \
        r.stdout + r.stderr


def test_the_second_part_of_the_gpu_reference_script_refuses_to_start_without_the_first(tmp_path):
    env = {**os.environ, "PART": "2", "RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "quant/gpu_reference.sh"], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "run PART=1 first" in r.stderr


def test_weight_decay_skips_biases_norms_and_the_token_embeddings():
    from quant.train import param_groups
    model = VisionTransformer(TINY)
    decay, no_decay = param_groups(model, 0.05)
    name = {id(p): n for n, p in model.named_parameters()}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "head.bias"} <= {name[id(p)] for p in no_decay["params"]}
    assert "head.weight" in {name[id(p)] for p in decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


def test_a_resume_state_with_negative_training_seconds_is_refused(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=8, augment=NO_AUG)
    fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**state, "trained_seconds": -1.0}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="holds a damaged resume state"):
        fit(VisionTransformer(TINY), colour_set(8), None, cfg, tmp_path, progress=False)


def test_a_resume_state_without_its_config_is_refused_by_name(tmp_path):
    from quant.train import read_resume_state
    torch.save({k: 0 for k in ("model", "optimizer", "rng", "epoch", "trained_seconds")}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"not a bitvit resume state \(no config\)"):
        read_resume_state(tmp_path / "last.pt", "delete it to start over")


@pytest.mark.parametrize("content, message", [
    (lambda: ["model", "optimizer", "rng", "epoch", "trained_seconds", "config"], "no a dict at the top"),
    (lambda: {"model": {}, "optimizer": {}, "rng": torch.zeros(1), "epoch": 1, "trained_seconds": 1.0,
              "config": 5}, "of the wrong kind"),
    (lambda: {"model": {"w": torch.tensor([float("nan")])}, "optimizer": {}, "rng": torch.zeros(1), "epoch": 1,
              "trained_seconds": 1.0, "config": "{}"}, "NaN or infinite weights")],
    ids=["a-list", "config-not-text", "nan-weights"])
def test_a_resume_state_of_the_wrong_shape_or_with_nan_weights_is_refused(tmp_path, content, message):
    from quant.train import read_resume_state
    torch.save(content(), tmp_path / "last.pt")
    with pytest.raises(ValueError, match=message):
        read_resume_state(tmp_path / "last.pt", "delete it")


@pytest.mark.parametrize("config", ["{not json", "[1]"])
def test_a_resume_state_whose_config_is_no_json_object_is_refused_with_a_message(tmp_path, config):
    from quant.train import read_resume_state
    torch.save({"model": {}, "optimizer": {}, "rng": torch.zeros(1), "epoch": 1, "trained_seconds": 1.0,
                "config": config}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="its config is no JSON object"):
        read_resume_state(tmp_path / "last.pt", "delete it")


def test_a_resume_state_that_is_not_a_regular_file_is_refused_not_waited_on(tmp_path):
    from quant.train import read_resume_state
    os.mkfifo(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="is not a regular file"):
        read_resume_state(tmp_path / "last.pt", "delete it")


def test_cli_trains_on_a_tree_of_two_classes_the_fewest_a_classifier_takes(tmp_path):
    tree = write_tree(tmp_path / "t", splits=("train",), classes=("cat", "dog"))
    assert run(main, ["--model", "vit_cifar_tiny", "--data", str(tree), "--out", str(tmp_path / "run"),
                      "--epochs", "1", "--batch-size", "4"]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_the_curves_of_a_one_epoch_run_number_the_epoch_axis_in_whole_epochs(tmp_path, monkeypatch):
    import quant.train as train
    figs = []
    monkeypatch.setattr(train, "write_png", lambda path, fig, dpi: figs.append(fig))
    train.plot_log([{"epoch": 1, "train_loss": 2.0, "train_acc": 0.1, "val_top1": 0.2}], tmp_path / "c.png", "1 epoch")
    figs[0].canvas.draw()
    for ax in figs[0].axes:
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert "1" in labels and all(label.lstrip("−-").isdecimal() for label in labels), labels
