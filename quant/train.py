"""Train a ViT from scratch: `python -m quant.train --model vit_cifar_tiny --data PATH --out DIR`.

AdamW with linear warmup and cosine decay (over the epochs, or over a wall-clock budget for machines
lent by the minute), label smoothing, batched on-device augmentation
(crop, flip, TrivialAugment, mixup/cutmix), optional distillation from a teacher checkpoint,
bf16 autocast and `torch.compile` on CUDA, a checkpoint every epoch (or every N) that a rerun of
the same command resumes from, and fixed seeds. The same command runs on a CPU, one GPU, or N GPUs under
`torchrun --nproc-per-node N -m quant.train ...` (DistributedDataParallel).

`fit` is the training loop itself; quantization-aware training reuses it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from quant.augment import Augment, AugmentConfig
from quant.cli import (HelpFormatter, counted, finite_number, is_positive_int, mix_alpha, number_in, positive_int,
                       random_seed, run, run_folder, run_lock, thread_count, world_size, write_png, written_whole)
from quant.data import ImageSet, composed_name, load_split
from quant.distill import distill_loss, soft_cross_entropy
from quant.evaluate import evaluate
from quant.models import RESUME_STATE_KEYS, refuse_compressed_zip


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256            # global, over all processes (a multiple of their number)
    lr: float = 1e-3                 # peak learning rate
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    grad_clip: float = 1.0           # 0 disables
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: str = "none"            # none | hard | soft (needs a teacher)
    distill_weight: float = 0.5      # loss = (1 - w) * label loss + w * distillation loss
    distill_temperature: float = 1.0
    time_budget: float = 0.0         # seconds; > 0: the cosine decays over what the warmup leaves of them and
    seed: int = 0                    # training ends when it is spent, or at `epochs` if that comes first
                                     # (a run's first step, which compiles on CUDA, is not charged to it)
    init: str = ""                   # digest of the weights training started from (--init); "": random
    extra_loss: dict = field(default_factory=dict)  # the settings of `fit`'s extra_loss (quant.qat: its BitOPs
                                                    # and feature weights), so that a resumed run adds the same

    def __post_init__(self):
        """Refuse settings that would train on garbage without a word, naming the field (the optimiser and
        `fit` refuse the others)."""
        if not is_positive_int(self.epochs):  # 0 returned the untrained model as done
            raise ValueError(f"TrainConfig epochs must be a positive integer, got {self.epochs!r}")
        # a negative grad_clip flipped the gradients; a negative min_lr decayed the rate below 0 (gradient ascent);
        # a negative weight decay, set per parameter group past AdamW's own check, grew the weights
        for name in ("grad_clip", "min_lr", "weight_decay", "warmup_epochs"):
            if not (finite_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TrainConfig {name} must be a number >= 0, got {getattr(self, name)!r}")
        if not (finite_number(self.distill_weight) and 0 <= self.distill_weight <= 1):
            raise ValueError(f"TrainConfig distill_weight must be a number in [0, 1], got {self.distill_weight!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_log(path: Path, drop_torn: bool = False) -> list[dict]:
    """The epoch records of a run's `log.jsonl` (none if there is no log); blank lines are skipped, a damaged
    line is named. With `drop_torn`, a last line with no newline, the record of a run killed (or out of disk)
    while writing it, is dropped with a note (every record ends in one)."""
    if not path.exists():
        return []
    text = path.read_text()
    if drop_torn and text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        print(f"{path}: dropping its last line, a record cut short as it was written")
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and all(finite_number(record.get(k)) for k in ("epoch", "seconds"))
        except (json.JSONDecodeError, RecursionError):
            ok = False
        if not ok:
            raise ValueError(f"{path}, line {n}, is not an epoch record; fix or delete the log")
        records.append(record)
    return records


def plot_log(records: list[dict], path: str | os.PathLike, title: str) -> None:
    """A run's curves from its epoch records (`read_log`), written to `path` (PNG): the training loss, and the
    training accuracy (on augmented, mixed batches) beside val top-1 where it was scored."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in records]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in records], marker=".")
    loss_ax.set_ylabel("training loss (cross-entropy)")
    acc_ax.plot(epochs, [r["train_acc"] for r in records], marker=".", label="training (augmented batches)")
    val = [(r["epoch"], r["val_top1"]) for r in records if "val_top1" in r]
    if val:
        acc_ax.plot(*zip(*val), marker="o", label="val top-1")
    acc_ax.set_ylabel("accuracy (fraction right)")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        # whole epochs, one at least: a one-epoch run's axis reads "1", not 0.945 ... 1.050
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    write_png(path, fig, dpi=100)


def _trim_log(path: Path, epochs: int) -> None:
    """Drop the records of the epochs after `epochs` from a run's log (a resumed run redoes them), and a record cut
    short as it was written (one of those: it is written before the resume state); the log is rewritten whole or
    not at all."""
    records = read_log(path, drop_torn=True)
    if path.exists():
        with written_whole(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records if r["epoch"] <= epochs))


def _fingerprint(data: ImageSet) -> str:
    """A digest of a training set's images, labels and classes (a resumed run must train on the same)."""
    h = hashlib.blake2b(digest_size=16)
    for part in (data.images.shape, data.classes):
        h.update(repr(part).encode())
    h.update(np.ascontiguousarray(data.labels).tobytes())
    h.update(np.ascontiguousarray(data.images).tobytes())
    return h.hexdigest()


def _weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights and buffers (a resumed run must distil from the same teacher)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def init_model(path: str, name: str) -> nn.Module:
    """The full-precision model in the file at `path` (`--init`: a warm restart of a finished run, or a fine-tune
    on other data of the same classes): a bitvit ViT or CNN teacher, or a timm/DeiT checkpoint of the ViT config
    `name`. Loaded before the data, so that data of other classes is refused before it is decoded."""
    from quant.models import CONFIGS, is_torch_file, load_model, read_safetensors_metadata
    from quant.packfile import load_any
    from quant.qlinear import is_quantized_layer
    foreign = name in CONFIGS and (  # a timm/DeiT file: its config is the named one
        is_torch_file(path) or not str(read_safetensors_metadata(path).get("format", "")).startswith("bitvit-"))
    start = load_model(path, name=name) if foreign else load_any(path)
    if any(map(is_quantized_layer, start.modules())):
        raise ValueError(f"--init {path} is a quantized model; start from a full-precision one (a quantization-"
                         f"aware run warm-restarts from its training state: python -m quant.qat --init "
                         f"RUN_DIR/finetune/last.pt)")
    return start


def start_from(model: nn.Module, start: nn.Module, path: str) -> str:
    """Copy the weights of `start`, the `init_model` of the file at `path`, into `model` and return their digest.
    It must be the network being trained: of the same class, config, classes and input normalisation (training
    settings such as stochastic depth aside)."""
    if type(start) is not type(model):
        raise ValueError(f"--init {path} holds a {type(start).__name__}, not the {type(model).__name__} to train")
    was, now = dataclasses.asdict(start.config), dataclasses.asdict(model.config)
    was["classes"] = tuple(map(composed_name, was["classes"]))  # composed as a tree's are (one trained on a Mac's: NFD)
    differ = [f"{k} {was[k]!r} (to train: {now[k]!r})" for k in was if k != "drop_path_rate" and was[k] != now[k]]
    if differ:
        raise ValueError(f"--init {path} holds another model than the one to train: {'; '.join(differ)}")
    model.load_state_dict(start.state_dict())
    return _weights_digest(model)


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig, seconds: float = 0.0,
          budget: float | None = None, warmup_seconds: float = 0.0, start: tuple[int, float] = (0, 0.0),
          peak: float | None = None) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_lr` over the remaining `total` steps
    (the last, step `total - 1`, at `min_lr`, unless it is the only one; a peak below `min_lr` is kept, never
    exceeded); with `cfg.time_budget`, over what
    the warmup left of the budget (`seconds`: training time spent so far; `warmup_seconds`: when the warmup
    ended) or the steps, whichever runs out first. `budget` (seconds) replaces `cfg.time_budget` when given.
    A warmup cut short mid-way rises from `start` (the step it was cut at, the rate it had reached) to `peak`
    (default `cfg.lr`), where the decay starts."""
    s0, lr0 = start
    peak = cfg.lr if peak is None else peak
    if step < warmup:
        return lr0 + (peak - lr0) * (step - s0 + 1) / (warmup - s0)
    t = (step - warmup) / max(1, total - warmup - 1) if step < max(total - 1, 1) else 1.0
    budget = cfg.time_budget if budget is None else budget
    if budget:
        t = max(t, (seconds - warmup_seconds) / max(budget - warmup_seconds, 1e-9))
    floor = min(cfg.min_lr, peak)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, the class token and position embeddings (1-D or tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_device(device: str | None) -> None:
    """Refuse a device other than cpu and cuda[:N], or CUDA on a machine without it (None: the default)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):  # torch knows mps, meta, xpu, ...: each would fail later
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():  # "invalid ordinal"
        raise ValueError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                         f"device{'s' if torch.cuda.device_count() != 1 else ''} (cuda:0 first)")


def resolve_device(device: str | None) -> torch.device:
    """The device a run trains on: `device`, else CUDA when there is one; "cuda" is this process's GPU
    (torchrun's LOCAL_RANK; the first outside torchrun)."""
    check_device(device)
    d = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if d.type == "cuda" and d.index is None:
        d = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) if world_size() > 1 else 0}")
        if d.index >= (n := torch.cuda.device_count()):  # else "invalid device ordinal" from torch
            raise ValueError(f"torchrun started more processes on this machine than its {counted(n, 'CUDA device')}; "
                             f"give --nproc-per-node {n} at most")
    return d


class _Dist:
    """Rank, world size and device, from torchrun's environment when present."""

    def __init__(self, device: str | None):
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0  # one process: 0, whatever RANK says
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        if cuda and torch.device(device or "cuda").index is not None \
                and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:  # NCCL fails on a GPU two processes share
            raise ValueError(f"device {device!r} puts every process torchrun starts here on one GPU; give cuda "
                             f"(each process takes its own, LOCAL_RANK)")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, value: float) -> float:
        """The largest of `value` over all processes, so that clock-driven decisions are shared."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def settle(self, error: Exception | None) -> None:
        """End every process where any failed (a collective: each passes its own error, or None): a process
        raises its error where no process of a lower rank has the same (rank 0 its own; another its own cause,
        such as a machine without the data, once for that machine's processes), and the rest end with exit code 2
        and no word, so that an error every process, or every process of a machine, hits is printed once."""
        errors = self.gather(None if error is None else str(error))
        if any(e is not None for e in errors):
            if error is not None and str(error) not in errors[:self.rank]:
                raise error
            raise SystemExit(2)

    def gather(self, obj) -> list:
        """`obj` of every process, by rank (a collective: every process calls it)."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs


def per_process_batch(batch_size: int, world: int) -> int:
    """Each of `world` processes' share of the global `batch_size`, which must divide among them (each process
    taking the quotient would train a smaller batch than the one asked for)."""
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not divide among {world} processes; give a multiple of {world} "
                         f"(to resume a run, which keeps its batch size, start a number of processes that divides it)")
    return batch_size // world


def read_resume_state(path: Path, advice: str) -> dict:
    """A resume state `fit` wrote (`last.pt`), read without unpickling code, its "config" parsed from its
    JSON, or one clear error ending in `advice`."""
    if not path.is_file():  # a folder, or a FIFO that torch.load would wait on forever
        raise ValueError(f"{path} is not a regular file; {advice}")
    refuse_compressed_zip(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or pickled-code files
        raise ValueError(f"{path} is not a readable resume state ({type(e).__name__}); {advice}") from None
    missing = RESUME_STATE_KEYS - set(state) \
        if isinstance(state, dict) else {"a dict at the top"}
    if missing:
        raise ValueError(f"{path} is not a bitvit resume state (no {', '.join(sorted(missing))}); {advice}")
    if not isinstance(state["model"], dict) or not isinstance(state["config"], str):
        raise ValueError(f"{path} is not a bitvit resume state (its model weights or config are of the wrong "
                         f"kind); {advice}")
    try:
        state["config"] = json.loads(state["config"])
    except (json.JSONDecodeError, RecursionError):
        state["config"] = None
    if not isinstance(state["config"], dict):  # fit compares it field by field with the run's
        raise ValueError(f"{path} holds a damaged resume state (its config is no JSON object); {advice}")
    bad = next((k for k, v in state["model"].items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"{path} holds NaN or infinite weights ({bad}); {advice}")
    return state


def _resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, run_key: dict,
            env: _Dist, warmup: int) -> tuple[int, float, float, int, float | None, tuple[int, float], float]:
    """Restore `model`, `opt` and the random streams from the resume state at `path`, once it is checked to be
    from a run of the same `cfg` and `run_key`, and trim the run's log to its epochs. Returns where the schedule
    stands: the epochs done, the seconds trained and per step, the warmup's steps (at most `warmup`), the
    budget's clock when the warmup ended (None: it goes on), the (step, rate) it rises from, the peak rate."""
    state = read_resume_state(path, "delete it to start over")
    streams = state.get("rank_rngs")  # every process's random streams, by rank (one for a run of one process)
    own = streams[env.rank] if isinstance(streams, list) and len(streams) == env.world > 1 else state  # one: alike
    was, now = state["config"], json.loads(json.dumps(cfg.to_dict()))  # tuples as lists
    was.setdefault("extra_loss", now["extra_loss"])  # states written before it was kept: unchecked
    if was != now:
        changed = ", ".join(f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(was.keys() | now.keys())
                            if was.get(k) != now.get(k))
        raise ValueError(f"{path} was written by a run with another config ({changed}); "
                         f"use another run folder or delete it")
    for key, what in (("data_digest", "training images (another --data, --split or --limit)"),
                      ("model_config", "model config (another --model or --drop-path)"),
                      ("teacher_digest", "teacher (another --teacher)"),
                      ("recipe", "quantization recipe (another --recipe or --set)")):
        if key in state and state[key] != run_key[key]:  # states written before these were kept: unchecked
            raise ValueError(f"{path} was written by a run with other {what}; use another run folder "
                             f"or delete it")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # written while training another model
        raise ValueError(f"{path} holds the resume state of another model "
                         f"({(str(e).splitlines() or [''])[0][:120]}); use another run folder or delete it") \
            from None
    try:
        torch.set_rng_state(own["rng"])
        epoch, trained = int(state["epoch"]), float(state["trained_seconds"])
        step_seconds = float(state.get("step_seconds", 0.0))  # the budget's clock runs on from the first step
        warmup = min(warmup, int(state.get("warmup", warmup)))  # as a time budget may have cut it
        warmup_seconds = state.get("warmup_seconds", 0.0)  # states kept before it: over all the budget
        warmup_seconds = None if warmup_seconds is None else float(warmup_seconds)
        s0, lr0 = state.get("warmup_start", (0, 0.0))  # states kept before it: a warmup never cut mid-way
        start = (int(s0), float(lr0))
        peak = float(state.get("peak", cfg.lr))
        if not (0 <= epoch <= cfg.epochs and 0 <= trained < math.inf and warmup >= 0
                and 0 <= step_seconds < math.inf and (warmup_seconds is None or 0 <= warmup_seconds < math.inf)
                and 0 <= start[0] <= warmup and 0 <= start[1] <= cfg.lr and 0 <= peak <= cfg.lr):
            raise ValueError(f"epoch {epoch} of {cfg.epochs}, {trained} s trained, warmup {warmup}, "
                             f"{step_seconds} s a step, warmup ended at {warmup_seconds} s, rising from {start}, "
                             f"decaying from {peak}")
    except (TypeError, ValueError, RuntimeError, ArithmeticError, LookupError) as e:
        raise ValueError(f"{path} holds a damaged resume state ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:120]}); delete it to start over") from None
    if env.device.type == "cuda" and "cuda_rng" in own:  # the on-device augmentation's draws
        torch.cuda.set_rng_state(own["cuda_rng"], env.device)
    if env.rank and own is state:  # states written before every process's streams were kept, or by another
        torch.manual_seed(cfg.seed + env.rank + 1000 * epoch)  # number of processes: a stream of its rank and epoch
    if env.main:
        print(f"resuming from {path} after epoch {epoch}")
        if isinstance(streams, list) and len(streams) != env.world:  # (states written before it was kept: no word)
            print(f"{path} was saved by {len(streams)} process(es), this run has {env.world}: it trains on with the "
                  f"same global batch of {cfg.batch_size} images, from other augmentation draws than an unbroken run")
        _trim_log(path.with_name("log.jsonl"), epoch)
    return epoch, trained, step_seconds, warmup, warmup_seconds, start, peak


def _rng_state(device: torch.device) -> dict:
    """This process's random streams: the augmentation's and stochastic depth's draws."""
    return {"rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda"
                                              else {})}


def _save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, run_key: dict,
                rngs: list[dict], **schedule) -> None:
    """Write the resume state `_resume` reads: the weights, optimizer and random streams (`rngs`, every
    process's `_rng_state` by rank), `schedule` (epoch, trained_seconds, warmup, step_seconds, warmup_seconds,
    warmup_start, peak), the config and `run_key`."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), **rngs[0],
             "rank_rngs": rngs, **schedule,
             "config": json.dumps(cfg.to_dict(), sort_keys=True), **run_key}
    with written_whole(path) as tmp, open(tmp, "wb") as f:  # a file object: its write's error is kept
        try:
            torch.save(state, f)
        except RuntimeError as e:  # torch's zip writer says "unexpected pos" where the write failed (a full disk)
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def fit(model: nn.Module, train: ImageSet, val: ImageSet | None, cfg: TrainConfig,
        out_dir: str | os.PathLike, teacher: nn.Module | None = None, device: str | None = None,
        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None, progress: bool = True,
        time_limit: float | None = None, save_every: int = 1,
        end_within_time_limit: bool = False) -> tuple[nn.Module, bool]:
    """Train `model` in place on `train`, scoring `val` every `save_every` epochs and after the last.

    Returns the model and whether training is done (all epochs, or `cfg.time_budget` spent). Logs
    every epoch to `out_dir/log.jsonl` and writes `out_dir/last.pt` (resume state) whenever it scores
    `val`; if `last.pt` from the same config exists it resumes from it. `extra_loss(model)` is added
    to the loss (quantization-aware training uses it for its bit budget). With `time_limit`
    (seconds), it stops at the end of the last epoch that fits, saving the resume state, so a rerun
    resumes (for machines lent by the command, such as 10-minute GPU jobs).
    With `end_within_time_limit` (and `cfg.time_budget`), the budget shrinks, from the second epoch on,
    to what the time limit leaves, so that a run that must end within one call still decays its
    learning rate to `min_lr` and ends complete, instead of being stopped mid-schedule.
    """
    from tqdm import tqdm
    if cfg.distill != "none" and teacher is None:
        raise ValueError(f"distill={cfg.distill!r} needs a teacher model")
    if save_every < 1:
        raise ValueError(f"save_every must be at least 1, got {save_every}")
    if not 0 <= cfg.time_budget < math.inf:
        raise ValueError(f"the time budget must be positive seconds (or 0: none), got {cfg.time_budget}")
    env = _Dist(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + env.rank)  # each process its own augmentation draws (DDP makes the weights agree)
    np.random.seed((cfg.seed + env.rank) % 2**32)  # numpy takes seeds below 2**32 only (--seed takes up to 2**32 - 1)

    model.to(env.device)
    if teacher is not None:
        teacher.to(env.device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999),
                            fused=env.device.type == "cuda")
    per_rank = per_process_batch(cfg.batch_size, env.world)
    if per_rank < 1 or per_rank > len(train) // env.world:
        raise ValueError(f"batch size {cfg.batch_size} does not fit {len(train)} images on {env.world} process(es)")
    steps_per_epoch = len(train) // env.world // per_rank
    total = steps_per_epoch * cfg.epochs
    warmup = int(min(steps_per_epoch * cfg.warmup_epochs, total // 2))  # a short run still decays (and
    # --warmup-epochs 1e308, whose steps are infinite, too)
    # what else a resumed run must share with the run that wrote the state: its images, model, teacher and
    # quantization recipe (quant.qat's: the students of w1.58a8 and w1a8, or of two Q-ViT budgets, hold the same tensors)
    run_key = {"data_digest": _fingerprint(train),
               "model_config": model.config.to_json() if hasattr(model, "config") else None,
               "teacher_digest": _weights_digest(teacher) if teacher is not None else None,
               "recipe": getattr(model, "quant_recipe", None)}   # a dict: budget_bits 3 and 3.0 are one recipe

    ckpt_path, failed = out / "last.pt", None
    try:  # a damaged log, which rank 0 alone reads, ends every process; a refused state is named once (`settle`)
        if ckpt_path.exists():
            start_epoch, trained, step_seconds, warmup, warmup_seconds, start, peak = _resume(
                ckpt_path, model, opt, cfg, run_key, env, warmup)
        else:
            start_epoch, trained, step_seconds = 0, 0.0, 0.0  # epochs done, seconds spent in training steps, per step
            warmup_seconds = None  # the budget's clock when the warmup ended (None: it goes on)
            start, peak = (0, 0.0), cfg.lr  # the step and rate the warmup rises from, the rate the decay starts from
            if env.main:
                (out / "log.jsonl").unlink(missing_ok=True)  # a fresh run: no earlier run's epochs in its log
    except (ValueError, OSError) as e:
        failed = e
    env.settle(failed)
    epochs = env.gather(start_epoch)  # a machine whose run folder is its own would train other epochs, and wait
    env.settle(ValueError(f"the processes found other resume states in {out}: epochs done {', '.join(map(str, epochs))}"
                          f" by rank; give every machine of the run the same run folder (a shared one)")
               if len(set(epochs)) > 1 else None)

    cuda = env.device.type == "cuda"
    fwd = model
    if env.world > 1:
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if cuda else None)
    if cuda:
        fwd = torch.compile(fwd)
    augment = Augment(cfg.augment, model.config.num_classes, model.config.mean, model.config.std)
    images = torch.from_numpy(train.images).to(env.device)   # (N, H, W, 3) uint8, on the device
    labels = torch.from_numpy(train.labels).to(env.device)

    # Clock-driven choices (the budget's learning rate, when to stop) use times agreed by all
    # processes at each epoch's end (the slowest one's); within an epoch the budget's clock advances by the last
    # epoch's seconds per step, never backwards, so every process sets the same learning rate.
    # The first step of each run is timed apart and not charged to the budget: on CUDA it compiles
    # the model, which can take longer than a short budget's training.
    started, epoch_seconds, clock, done = time.perf_counter(), 0.0, 0.0, True
    budget = cfg.time_budget  # the cosine's horizon in training seconds (0: none)
    # whether the next epoch would overrun the time limit: decided at each epoch's end, where it also saves
    out_of_time = env.agree(time_limit is not None and time.perf_counter() - started > time_limit)
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.time_budget and trained >= budget:
            break
        here = epoch * steps_per_epoch
        cut = int(here + (budget - trained) / step_seconds) // 2 if budget and step_seconds else warmup
        if cut < warmup and here < warmup:  # a budget shorter than the warmup: cut it to half the steps the budget
            # holds; the rate rises on from where it stands, to the peak if as many steps are left as were taken,
            # to a lower one if fewer (none: it decays from where it stands), never leaping up
            start = (here, lr_at(here - 1, total, warmup, cfg, start=start, peak=peak))
            warmup = max(cut, here)
            peak = start[1] + (cfg.lr - start[1]) * min(1.0, (warmup - here) / here)
        if out_of_time:
            if env.main:
                print(f"time limit: stopping after epoch {epoch} of {cfg.epochs}; rerun to resume")
            done = False
            break
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(train), generator=g)[env.rank::env.world][:steps_per_epoch * per_rank]
        order = order.to(env.device)
        desc = (f"epoch {epoch + 1} ({trained / cfg.time_budget:.0%} of {cfg.time_budget:.0f} s)"
                if cfg.time_budget else f"epoch {epoch + 1}/{cfg.epochs}")
        bar = tqdm(range(steps_per_epoch), desc=desc, unit="step",
                   disable=not (progress and env.main), leave=False, dynamic_ncols=True)
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        for i in bar:
            step = epoch * steps_per_epoch + i
            clock = max(clock, trained + i * step_seconds)
            if warmup_seconds is None and step >= warmup:  # the budget's cosine starts where the warmup ends
                warmup_seconds = clock
            lr = lr_at(step, total, warmup, cfg, seconds=clock, budget=budget, warmup_seconds=warmup_seconds or 0.0,
                       start=start, peak=peak)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i * per_rank:(i + 1) * per_rank]
            x, target = augment(images[idx], labels[idx])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = fwd(x)
                loss = soft_cross_entropy(logits.float(), target)
                if teacher is not None and cfg.distill != "none":
                    with torch.no_grad():
                        t_logits = teacher(x).float()
                    loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * distill_loss(
                        logits.float(), t_logits, cfg.distill, cfg.distill_temperature)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                # over the parameters trained: a frozen one may keep an earlier stage's gradient (Q-ViT's widths)
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            if epoch == start_epoch and i == 0:
                if cuda:
                    torch.cuda.synchronize()
                first_step_seconds = time.perf_counter() - t0
            if i % 10 == 0 or i == steps_per_epoch - 1:  # syncing every step would stall the GPU
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == target.argmax(1)).sum())
                seen += len(idx)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                img_s=f"{(i + 1) * per_rank * env.world / (time.perf_counter() - t0):.0f}")
        bar.close()
        if env.world > 1:  # the log's loss and accuracy: over every process's sampled steps, not rank 0's alone
            sums = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=env.device)
            dist.all_reduce(sums)
            loss_sum, correct, seen = sums.tolist()
        weights_finite = bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())  # 1 sync
        if not (math.isfinite(loss_sum) and weights_finite):
            # every later step would be NaN too: stop before scoring or saving the weights
            if not env.main:  # rank 0 says why: the loss, summed over every process, and the weights are its own too
                raise SystemExit(2)
            what, advice = "the loss or the weights", "a lower --lr"
            if cfg.distill != "none":  # a teacher's NaN logits make the loss NaN (quant.distill)
                what = "the loss, the weights or the teacher's logits"
                advice += ", or a teacher whose logits are finite"
            raise ValueError(f"training diverged in epoch {epoch + 1} ({what} are NaN or infinite): start again in a "
                             f"run folder other than {out} with {advice}")
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                  "train_acc": correct / max(seen, 1), "lr": opt.param_groups[0]["lr"], "seconds": seconds}
        # the epoch without a first step: what the budget is charged, and the next epoch's forecast
        epoch_seconds, steps = seconds, steps_per_epoch
        if epoch == start_epoch:
            epoch_seconds, steps = seconds - first_step_seconds, max(steps_per_epoch - 1, 1)
            record["first_step_seconds"] = first_step_seconds
        epoch_seconds = env.agree(epoch_seconds)  # so the budget's clock, logged as such, is every process's
        trained += epoch_seconds
        step_seconds = epoch_seconds / steps
        record["trained_seconds"] = trained
        if end_within_time_limit and budget and time_limit is not None:
            # spend the budget by the last epoch the limit leaves room for: keep an epoch and a half
            # and 2 % of what is left (scoring val, saving, logging) in reserve; shrunk here, so that an
            # epoch the shrunk budget ends is the last, scored and saved
            left = time_limit - env.agree(time.perf_counter() - started)
            # (to what is trained at least: a limit that leaves no room ends the run here, with no negative budget;
            # never above the budget given, which an epoch may have overrun)
            budget = min(budget, max(trained, trained + 0.98 * left - 1.5 * epoch_seconds))
        if budget != cfg.time_budget:
            record["time_budget"] = budget
        last = epoch + 1 == cfg.epochs or bool(cfg.time_budget and trained >= budget)
        out_of_time = env.agree(time_limit is not None
                                and time.perf_counter() - started + epoch_seconds > time_limit)
        save = last or out_of_time or (epoch + 1) % save_every == 0
        if val is not None and save:
            # (minutes on a CPU for vit_cifar_small's 5,000 val images, after the epoch's bar has gone)
            record["val_top1"] = evaluate(model, val, device=env.device, progress=progress and env.main)["top1"]
        if env.main:
            print(json.dumps(record), flush=True)
            try:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                    if save:  # on disk before the resume state that counts it, else lost by a power cut after both
                        f.flush()
                        os.fsync(f.fileno())
            except OSError as e:  # a full disk: the write's error names no file
                raise OSError(e.errno, e.strerror, str(out / "log.jsonl")) from None
        rngs = env.gather(_rng_state(env.device)) if save else None
        if env.main and save:
            _save_state(ckpt_path, model, opt, cfg, run_key, rngs, epoch=epoch + 1, trained_seconds=trained,
                        warmup=warmup, step_seconds=step_seconds, warmup_seconds=warmup_seconds,
                        warmup_start=start, peak=peak)
    if env.world > 1:
        dist.barrier()
    return model.cpu().eval(), done


def main(argv=None):
    from quant import teacher as cnn
    from quant.models import CONFIGS, count_parameters, create_model, save_model
    from quant.packfile import load_any
    d, a = TrainConfig(), AugmentConfig()
    p = argparse.ArgumentParser(prog="python -m quant.train", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="vit_cifar_tiny", choices=list(CONFIGS) + list(cnn.CONFIGS),
                   help="a ViT config, or a CNN teacher (quant.teacher) to distil a ViT from later")
    p.add_argument("--data", required=True, help="CIFAR-10 .tar.gz, its folder, cifar-10-batches-py or an image tree")
    p.add_argument("--out", required=True, help="run folder: model.safetensors, last.pt, log.jsonl")
    p.add_argument("--split", default="train", choices=["train", "trainval"],
                   help="train (holds out val for model selection) or trainval (all training images)")
    p.add_argument("--limit", type=positive_int, help="this many images of the split, and of val, only (smoke tests)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="epochs (with --time-budget: at most)")
    p.add_argument("--time-budget", type=number_in(0), default=d.time_budget,
                   help="seconds of training: the learning rate decays over what the warmup leaves of them and "
                        "training ends when they are spent (for a fixed-length GPU lease); 0 = schedule by epochs")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images a step (the global batch)")
    p.add_argument("--lr", type=number_in(0), default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=number_in(0), default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=number_in(0), default=d.warmup_epochs, help="epochs of linear warmup")
    p.add_argument("--drop-path", type=number_in(0, 1, hi_open=True), default=0.1,
                   help="stochastic depth rate of the last block")
    p.add_argument("--label-smoothing", type=number_in(0, 1), default=a.label_smoothing, help="label smoothing, 0..1")
    p.add_argument("--mixup", type=mix_alpha, default=a.mixup_alpha, help="mixup alpha, 0 disables")
    p.add_argument("--cutmix", type=mix_alpha, default=a.cutmix_alpha, help="cutmix alpha, 0 disables")
    p.add_argument("--mix-prob", type=number_in(0, 1),
                   help=f"chance a batch is mixed, with --mixup or --cutmix (default {a.mix_prob})")
    p.add_argument("--no-trivial-augment", action="store_true", help="train without TrivialAugment")
    p.add_argument("--teacher", help="model file to distil from: a bitvit ViT or a CNN teacher")
    p.add_argument("--distill", choices=["hard", "soft"], help="with --teacher (default hard)")
    p.add_argument("--seed", type=random_seed, default=d.seed, help="random seed, 0..2^32-1")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads")
    p.add_argument("--time-limit", type=number_in(0, lo_open=True),  # 0 would train nothing (no limit: leave it out)
                   help="stop after the last epoch that fits in this many seconds; rerun the same command to resume")
    p.add_argument("--end-within-time-limit", action="store_true",
                   help="with --time-budget and --time-limit: shrink the budget to what the limit leaves, so "
                        "the learning rate decays fully and the run ends complete (one-call runs)")
    p.add_argument("--save-every", type=positive_int, default=1,
                   help="score the val split and write the resume state every N epochs (and after the last)")
    p.add_argument("--init", metavar="MODEL",
                   help="start from this model file's weights instead of random ones (a finished run's "
                        "model.safetensors, or a timm/DeiT checkpoint, of the same --model and classes): a warm "
                        "restart, whose warmup and decay start over")
    args = p.parse_args(argv)
    env = _Dist(args.device)  # torchrun's processes join here (fit trains in this group); rank 0 shows the progress
    lock, failed = contextlib.ExitStack(), None
    try:  # an error every process hits (a bad --data) is printed once, by rank 0; one some hit ends every process
        if args.distill and not args.teacher:
            raise ValueError(f"--distill {args.distill} needs --teacher, the model file to distil from")
        if args.mix_prob is not None and args.mixup == 0 and args.cutmix == 0:
            raise ValueError("--mix-prob is the chance a batch is mixed: use it with --mixup or --cutmix, not with "
                             "both 0")
        if args.end_within_time_limit and not (args.time_budget and args.time_limit is not None):
            raise ValueError("--end-within-time-limit needs --time-budget and --time-limit (it shrinks the budget to "
                             "what the limit leaves)")
        run_folder(args.out)
        for name in ("model.safetensors", "last.pt", "log.jsonl", "curves.png"):  # else found at the end of training
            if (Path(args.out) / name).is_dir():
                raise ValueError(f"{Path(args.out) / name} is a folder, where the run writes its {name}; move it away")
        if args.threads:
            torch.set_num_threads(args.threads)

        mix_prob = a.mix_prob if args.mix_prob is None else args.mix_prob
        cfg = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs, time_budget=args.time_budget, seed=args.seed,
            augment=AugmentConfig(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, mix_prob=mix_prob,
                                  label_smoothing=args.label_smoothing,
                                  trivial_augment=not args.no_trivial_augment),
            distill=(args.distill or "hard") if args.teacher else "none")
        is_cnn = args.model in cnn.CONFIGS
        img_size = (cnn.CONFIGS if is_cnn else CONFIGS)[args.model].img_size
        per_process_batch(cfg.batch_size, env.world)  # refused before the data is decoded
        # the teacher first: data of other classes than its own is refused before it is decoded, not after
        teacher = load_any(args.teacher) if args.teacher else None
        start = init_model(args.init, args.model) if args.init else None  # as is the --init file
        if teacher is not None and teacher.config.img_size != img_size:  # it sees the student's images
            raise ValueError(f"the teacher {args.teacher} takes {teacher.config.img_size}x"
                             f"{teacher.config.img_size} images; the student {args.model} takes "
                             f"{img_size}x{img_size}")

        def same_classes(data):  # as the teacher's and the --init file's
            for m, whose in ((teacher, f"the teacher {args.teacher}'s"), (start, f"the --init file {args.init}'s")):
                if m is not None:
                    data.require_classes(m.config, whose)
            return data
        train = load_split(args.data, args.split, img_size, limit=args.limit, progress=env.main, check=same_classes)
        if len(train.classes) < 2:  # a model of one class is right about every image it is shown
            raise ValueError(f"{args.data} holds one class ({train.classes[0]!r}) in its {args.split} split: a "
                             f"classifier is trained on two or more class folders")
        torch.manual_seed(cfg.seed)
        labels = dict(num_classes=len(train.classes), classes=tuple(train.classes))
        model = (cnn.create_teacher(args.model, **labels) if is_cnn
                 else create_model(args.model, drop_path_rate=args.drop_path, **labels))
        # a tree's own val/ folder may name other classes: refused before it is decoded, not after an epoch
        val = (load_split(args.data, "val", img_size, limit=args.limit, progress=env.main,
                          check=lambda s: s.require_classes(model.config, whose="the train split's"))
               if args.split == "train" else None)
        if args.init:
            cfg.init = start_from(model, start, args.init)
        if teacher is not None:
            if any(tuple(getattr(teacher.config, k)) != tuple(getattr(model.config, k))
                   for k in ("mean", "std")):  # it sees the student's normalised input
                raise ValueError(f"the teacher {args.teacher} was trained on inputs normalised with mean "
                                 f"{teacher.config.mean}, std {teacher.config.std}; the student uses "
                                 f"{model.config.mean}, {model.config.std}")
        if env.main:
            print(f"{args.model}: {count_parameters(model):,} parameters{f' from {args.init}' if args.init else ''}; "
                  f"{len(train)} training images"
                  f"{f', {len(val)} validation images' if val is not None else ''}, seen at {img_size}x{img_size} "
                  f"pixels (shorter side resized to {img_size}, then centre-cropped)")
            lock.enter_context(run_lock(args.out))  # torchrun's other processes share its lock
    except (ValueError, OSError) as e:
        failed = e
    with lock:
        env.settle(failed)
        model, done = fit(model, train, val, cfg, args.out, teacher=teacher, device=args.device,
                          time_limit=args.time_limit, save_every=args.save_every,
                          end_within_time_limit=args.end_within_time_limit)
        # (under the lock: a rerun let in as training ends would log epochs while this run reads the log)
        if env.main:  # a run stopped by --time-limit still saves the model so far, marked incomplete
            records = read_log(Path(args.out) / "log.jsonl")
            seconds = sum(r["seconds"] for r in records)  # all its runs' epochs
            meta = {"train_config": json.dumps(cfg.to_dict()), "train_split": args.split, "init": args.init or "",
                    "train_seconds": f"{seconds:.0f}", "complete": str(done).lower()}
            (cnn.save_teacher if is_cnn else save_model)(model, Path(args.out) / "model.safetensors", metadata=meta)
            print(f"saved {Path(args.out) / 'model.safetensors'}{'' if done else ' (incomplete: rerun to resume)'}")
            plot_log(records, Path(args.out) / "curves.png", f"{args.model}: {counted(len(records), 'epoch')} of "
                                                             f"{counted(len(train), args.split + ' image')}")
            print(f"curves: {Path(args.out) / 'curves.png'}")


if __name__ == "__main__":
    raise SystemExit(run(main, several_processes=True))
