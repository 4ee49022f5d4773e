"""Quantization-aware training: `python -m quant.qat --teacher FP --recipe R --data DATA --out PATH`.

The student starts as a copy of the full-precision teacher, gets the recipe's training-time layers
(`w1.58a8`, `w1a8`: BitNet `quant.bitlinear`; `qvit`: Q-ViT `quant.qvit`), and is trained with
`quant.train.fit` against the teacher's logits (KL at temperature T, mixed with the label loss by
`--distill-weight`) and, with `--feature-weight`, an MSE between the student's and teacher's final
token features. Q-ViT runs two stages, each its own `fit` (own cosine schedule and resume folder):
a searching stage of `--search-ratio` of the epochs (bit-widths learned under the BitOPs penalty),
then `fix_bits` and fine-tuning with the widths fixed. The trained model is frozen into packed
`QuantLinear` layers and written with `quant.save_quantized`; Q-ViT also writes its bit allocation
(`PATH.bits.json`) and its plot (`PATH.bits.png`).

Everything resumes: rerun the same command (e.g. after `--time-limit` stopped it) and each stage
continues from `--run-dir`. `--time-limit S` counts the training stages only, from the first one a run
trains in, not the student's initialisation before them (on `--calib-size` images; Q-ViT's step-size
search takes minutes on a small CPU) nor the reloading of a stage an earlier run finished, which every
run does again: a limit shorter than that still trains, so each rerun gets on (in a call of fixed
length, leave room for it as for loading the data). `--time-budget S` fits the training into S seconds
instead (for a GPU lent for a fixed time): each stage gets the share of S its epochs have, its cosine
decays over that time, and its epochs become a cap. `--init STATE` warm-restarts a BitNet run: the
student starts from the weights of an earlier run of the same recipe and teacher (a stage's `last.pt` in
its run folder) under a fresh schedule, so training can go on past the epochs that run was scheduled for
(in a run folder of its own: one holding another run's state, such as the one it starts from, is
refused).
`--eval-split test` scores the frozen file and its teacher on that split, on the device it trained on;
`--results FILE --name KEY` records the run (top-1, size, bits/weight, command, machine, wall time).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.cli import (HelpFormatter, counted, file_sha256, mix_alpha, name_fits, number_in, output_file, positive_int,
                       provenance, random_seed, run, run_folder, run_lock, thread_count, write_json)
from quant.data import SPLITS
from quant.recipes import QAT, BitNet, QViT


class FeatureDistill:
    """MSE between the student's and the teacher's final normalised tokens (B, N, D), as an
    `extra_loss` for `quant.train.fit`: forward hooks on both models' `norm` keep the latest outputs
    (fit runs the student, then the teacher, then calls the extra loss)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float):
        self.weight, self.feats = weight, {}
        for key, m in (("student", student), ("teacher", teacher)):
            m.norm.register_forward_hook(lambda mod, inp, out, key=key: self.feats.__setitem__(key, out))

    def __call__(self, model: nn.Module) -> torch.Tensor:
        s, t = self.feats.pop("student"), self.feats.pop("teacher")
        return self.weight * F.mse_loss(s.float(), t.float().detach())


def _sum_losses(*losses):
    losses = [f for f in losses if f is not None]
    if not losses:
        return None
    return lambda model: sum(f(model) for f in losses)


def read_results(path: str | os.PathLike) -> dict:
    """The results file {"runs": {name: entry, ...}} ({"runs": {}} when absent), or one clear error."""
    path = Path(path)
    if not path.exists():
        return {"runs": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON's, a bad encoding, a 5000-digit integer
        raise ValueError(f"{path} is not a readable results JSON ({type(e).__name__}: {e})") from None
    runs = data.get("runs") if isinstance(data, dict) else None  # none: another stage's file (ptq.json ...)
    if not isinstance(runs, dict) or not all(isinstance(e, dict) for e in runs.values()):
        raise ValueError(f'{path} is not a quant.qat results file ({{"runs": {{name: entry, ...}}}})')
    return data


def record_result(path: str | os.PathLike, name: str, entry: dict) -> None:
    """Insert or replace `entry` under `name` in the results file {"runs": {name: entry, ...}}."""
    path = Path(path)
    data = read_results(path)
    data["runs"][name] = entry
    write_json(path, data)


def _known_teacher_top1(results: str | None, teacher_sha256: str, split: str, n: int) -> float | None:
    """The teacher's top-1 on this split from an earlier entry of the same results file, if the same
    teacher (the SHA-256 of its file: not its path, which another working directory or a teacher trained again
    into it makes another file's) was scored on the same images there."""
    if not results:
        return None
    for e in read_results(results)["runs"].values():
        if (e.get("teacher_sha256"), e.get("split"), e.get("n")) == (teacher_sha256, split, n) \
                and isinstance(e.get("teacher_top1"), float):
            return e["teacher_top1"]
    return None


def read_init(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The student weights in an earlier QAT run's resume state (`RUN_DIR/finetune/last.pt`) and the recipe
    it records (None in states written before recipes were), read without unpickling code, or one clear error."""
    from quant.train import read_resume_state
    path, advice = Path(path), "give an earlier run's RUN_DIR/finetune/last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such resume state ({advice})")
    state = read_resume_state(path, advice)
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{path} is not a bitvit resume state (no model weights); {advice}")
    return weights, state.get("recipe")


def init_student(student: nn.Module, weights: dict[str, torch.Tensor], path, recipe: dict | None = None) -> None:
    """Load an earlier run's student weights (`read_init`) into a freshly prepared student of the same
    recipe and teacher, naming the first tensor that disagrees, or the recipe fields where the `recipe` the
    state records differs from the student's (w1.58a8 and w1a8 students hold the same tensors)."""
    if isinstance(recipe, dict) and recipe != student.quant_recipe:
        differ = ", ".join(f"{k} {recipe.get(k)!r} (this run: {v!r})" for k, v in student.quant_recipe.items()
                           if recipe.get(k) != v)
        raise ValueError(f"{path} holds a student of another recipe ({differ}); give a resume state of the same "
                         f"recipe and teacher")
    try:
        student.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{path} holds the weights of another student "
                         f"({(str(e).splitlines() or [''])[-1].strip()[:160]}); give a resume state of the same "
                         f"recipe and teacher") from None


def prepare_student(teacher: nn.Module, r, train, calib_size: int, seed: int, device: torch.device,
                    bitops_weight: float = 1.0, init: tuple[dict[str, torch.Tensor], dict | None, str] | None = None):
    """A copy of `teacher` with the QAT recipe `r`'s training-time layers, on `device`, initialised on
    `calib_size` training images (BitNet: its input LayerNorms; Q-ViT: step sizes and MAC counts), or,
    given `init` = (weights, recipe, path) from `read_init`, with an earlier BitNet run's weights instead.
    Returns (student, Q-ViT's BitOPs penalty or None)."""
    from quant import bitlinear, qvit, quantize
    from quant.data import to_model_input
    student = quantize(copy.deepcopy(teacher), r)
    student.to(device)  # calibrated where it trains: Q-ViT's step-size search takes minutes on a small CPU
    if init is not None:  # main allows it for BitNet only: Q-ViT's penalty needs calibrated MAC counts
        weights, recorded, path = init
        init_student(student, weights, path, recorded)
        return student, None
    cfg = student.config
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:calib_size].numpy()
    calib = to_model_input(train.images[pick], cfg.mean, cfg.std, device=device)
    if isinstance(r, BitNet):
        bitlinear.init_input_norms(student, calib)
        return student, None
    qvit.calibrate(student, calib)
    qvit.measure_macs(student, calib[:1])
    return student, qvit.BitOpsPenalty(student, r.budget_bits, eta=bitops_weight)


def train_stages(student: nn.Module, teacher: nn.Module, r, train, val, train_cfg, run_dir: Path,
                 search_epochs: int, penalty=None, features=None, time_limit: float | None = None,
                 device=None, save_every: int = 1) -> tuple[nn.Module, bool, list[dict]]:
    """Q-ViT: `search_epochs` learning bit-widths under the BitOPs penalty, `fix_bits`, then the rest
    fine-tuning; BitNet: one stage. Each stage is its own `fit` (schedule, resume folder) with its share
    of `train_cfg.time_budget`. Returns (student, done, every epoch's log record); done is False when
    `time_limit` (seconds, all stages together from the first this run trains in) stopped it. Each stage scores
    val and writes its resume state every `save_every` epochs and after its last."""
    from quant import qvit
    from quant.train import fit, read_log
    trained = False  # whether this run has trained an epoch
    stages = [("search", search_epochs, _sum_losses(penalty, features)),
              ("finetune", train_cfg.epochs - search_epochs, features)]
    for stage, epochs, extra in stages:
        if stage == "finetune" and isinstance(r, QViT) and r.learn_bits:  # also with no search epochs (a low
            qvit.fix_bits(student, r.budget_bits)  # --search-ratio): the widths must still be fixed, within the budget
            alloc = qvit.bit_allocation(student)
            print(f"searching stage done: BitOPs {alloc['bitops_ratio']:.3f} of the {r.budget_bits:g}-bit budget, "
                  f"mean weight bits {alloc['mean_weight_bits']:.2f}")
        if epochs == 0:
            continue
        if not trained:  # the limit counts from the first stage this run trains in: reloading one an earlier run
            started = time.time()  # finished, and fixing the widths after it, every rerun redoes, as it calibrates
        left = None if time_limit is None else time_limit - (time.time() - started)
        if left is not None and left <= 0:
            return student, False, []
        print(f"{stage} stage: {counted(epochs, 'epoch')} of {counted(len(train), 'image')}")
        stage_cfg = dataclasses.replace(train_cfg, epochs=epochs,
                                        time_budget=train_cfg.time_budget * epochs / train_cfg.epochs)
        log = run_dir / stage / "log.jsonl"
        logged = log.read_bytes() if log.exists() else None
        student, done = fit(student, train, val, stage_cfg, run_dir / stage, teacher=teacher, device=device,
                            extra_loss=extra, time_limit=left, save_every=save_every)
        if not done:
            return student, False, []
        trained = trained or (log.read_bytes() if log.exists() else None) != logged
    # the stages this run trained: the folder may keep the log of one an earlier run trained and this one skips
    return student, True, [record for stage, epochs, _ in stages if epochs
                           for record in read_log(run_dir / stage / "log.jsonl")]


def freeze_and_save(student: nn.Module, r, name: str, out: str, float16: bool) -> tuple[dict, dict | None]:
    """Freeze the trained student into packed QuantLinear layers and write it (Q-ViT: its bit allocation
    too, `out.bits.json` and `.png`); returns `save_quantized`'s storage totals and the allocation (Q-ViT)
    or None."""
    from quant import bitlinear, qvit, save_quantized
    student.cpu().eval()
    alloc = None
    if isinstance(r, QViT):
        alloc = qvit.save_allocation(student, f"{out}.bits.json", r.budget_bits)
        method = "Q-ViT" if r.learn_bits else "LSQ+"
        qvit.plot_allocation(alloc, f"{out}.bits.png", f"{method} {name} ({r.budget_bits:g}-bit budget)")
        qvit.freeze(student)
    else:
        bitlinear.freeze(student)
    return save_quantized(student, out, float16), alloc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quant.qat", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--teacher", required=True, help="full-precision bitvit model (.safetensors): teacher and start")
    p.add_argument("--recipe", required=True, help="w1.58a8, w1a8, qvit or lsq")
    p.add_argument("--data", required=True, help="CIFAR-10 .tar.gz, its folder, cifar-10-batches-py or an image tree")
    p.add_argument("--out", required=True, help="packed model file to write (.safetensors)")
    p.add_argument("--run-dir", help="resume folder of the training stages (default: PATH.run/)")
    p.add_argument("--init", metavar="STATE",
                   help="BitNet recipes: start from an earlier run's weights (RUN_DIR/finetune/last.pt) under a "
                        "fresh schedule (a warm restart)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set budget_bits=3 --set input_norm=false")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs")
    p.add_argument("--limit", type=positive_int, help="train on this many images only (balanced over classes)")
    p.add_argument("--val-limit", type=positive_int, default=2000, help="validation images scored after each epoch")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images a step")
    p.add_argument("--lr", type=number_in(0), default=5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=number_in(0), default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup-epochs", type=number_in(0), default=0.5, help="epochs of linear warmup")
    p.add_argument("--distill", default="soft", choices=["soft", "hard", "none"],
                   help="learn from the teacher's soft or hard predictions beside the labels, or the labels only")
    p.add_argument("--distill-weight", type=number_in(0, 1),
                   help="weight of the distillation loss (0..1, default 0.9; not with --distill none)")
    p.add_argument("--temperature", type=number_in(0, lo_open=True),
                   help="temperature of --distill soft (default 1)")
    p.add_argument("--feature-weight", type=number_in(0), default=0.0, help="weight of the token-feature MSE (0: off)")
    p.add_argument("--mixup", type=mix_alpha, default=0.0, help="mixup alpha (QAT default: off)")
    p.add_argument("--cutmix", type=mix_alpha, default=0.0, help="cutmix alpha (QAT default: off)")
    p.add_argument("--search-ratio", type=number_in(0, 1),
                   help="qvit: fraction of epochs searching bit-widths (default 0.5), rounded to the nearest epoch, "
                        "a half up")
    p.add_argument("--bitops-weight", type=number_in(0),
                   help="qvit: weight eta of the BitOPs penalty of its bit-width search (default 1)")
    p.add_argument("--calib-size", type=positive_int, default=256,
                   help="training images that initialise Q-ViT's step sizes or BitNet's input LayerNorms "
                        "(not used with --init)")
    p.add_argument("--eval-split", choices=SPLITS,
                   help="after training, score the packed model and the teacher on this split")
    p.add_argument("--eval-limit", type=positive_int, help="score only this many images of --eval-split")
    p.add_argument("--results", help="results JSON to record this run in (with --eval-split)")
    p.add_argument("--name", help="entry name in --results (default: the recipe name)")
    p.add_argument("--float16", action="store_true",
                   help="store the parameters left in floating point (embeddings, norms, biases, head) in float16")
    p.add_argument("--save-every", type=positive_int, default=1,
                   help="score the val split and write the resume state every N epochs (and after the last)")
    p.add_argument("--time-limit", type=number_in(0, lo_open=True),  # 0 would train nothing (no limit: leave it out)
                   help="stop after the last epoch that fits in this many seconds of training (all stages together; "
                        "the student's initialisation before them, redone by every run, not counted); rerun the "
                        "same command to resume")
    p.add_argument("--time-budget", type=number_in(0), default=0.0,
                   help="seconds of training for all stages together, shared by their epochs; the learning rate "
                        "decays over them and --epochs becomes a cap (0: schedule by epochs)")
    p.add_argument("--seed", type=random_seed, default=0, help="random seed, 0..2^32-1")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--threads", type=thread_count, help="torch CPU threads")
    return p


def main(argv=None):
    from quant import load_quantized, recipe
    from quant.augment import AugmentConfig
    from quant.data import load_split
    from quant.evaluate import evaluate
    from quant.models import load_model
    from quant.ptq import parse_overrides
    from quant.train import TrainConfig, _weights_digest, resolve_device

    args = _parser().parse_args(argv)
    output_file(args.out, ".safetensors", inputs=(args.teacher,))
    run_dir = run_folder(args.run_dir or name_fits(f"{args.out}.run", "give --run-dir PATH, or a shorter --out name"))
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.results and not args.eval_split:
        raise ValueError("--results needs --eval-split (the split the recorded top-1 is measured on)")
    if args.eval_limit and not args.eval_split:
        raise ValueError("--eval-limit needs --eval-split (the split to score that many images of)")
    if args.name and not args.results:
        raise ValueError("--name needs --results (the results file the run is recorded in under that name)")
    if args.results:
        read_results(args.results)  # a file it cannot record into is refused now, not after training
    if args.feature_weight > 0 and args.distill == "none":  # fit runs the teacher only to distil its logits
        raise ValueError("--feature-weight compares features with the teacher's: use it with --distill soft or hard")
    # like --feature-weight, the distillation options a --distill mode does without are refused, not ignored
    if args.distill_weight is not None and args.distill == "none":
        raise ValueError("--distill-weight weighs the distillation loss: use it with --distill soft or hard")
    if args.temperature is not None and args.distill != "soft":
        raise ValueError(f"--temperature softens the logits of soft distillation: use it with --distill soft, "
                         f"not --distill {args.distill}")
    args.distill_weight = 0.9 if args.distill_weight is None else args.distill_weight
    args.temperature = 1.0 if args.temperature is None else args.temperature
    r = recipe(args.recipe, **parse_overrides(args.set))
    if not isinstance(r, QAT):
        raise ValueError(f"{args.recipe} is a post-training recipe: use python -m quant.ptq --checkpoint "
                         f"{args.teacher} --recipe {args.recipe} ...")
    if args.init and not isinstance(r, BitNet):  # a Q-ViT student's widths are fixed between its two stages
        raise ValueError(f"--init warm-restarts the BitNet recipes (w1.58a8, w1a8), not {args.recipe}")
    searches = isinstance(r, QViT) and r.learn_bits  # a bit-width search (qvit; lsq keeps its widths)
    if isinstance(r, QViT):  # its bit allocation, written beside --out after training: refused now, not then
        name_fits(f"{args.out}.bits.json", "give a shorter --out name (the bit allocation is written beside it)")
    # the Q-ViT options do nothing with the other recipes: refused like --init, not ignored
    if args.search_ratio is not None and not searches:
        raise ValueError(f"--search-ratio sets the qvit recipe's bit-width search; {args.recipe} searches none")
    if args.bitops_weight is not None and not searches:
        raise ValueError(f"--bitops-weight weighs the qvit recipe's bit-width search; {args.recipe} searches none")
    args.search_ratio = 0.5 if args.search_ratio is None else args.search_ratio
    args.bitops_weight = 1.0 if args.bitops_weight is None else args.bitops_weight
    init = (*read_init(args.init), args.init) if args.init else None

    teacher = load_model(args.teacher)
    # its file as loaded: a teacher trained again into the path while this run trains is another one
    teacher_file = {"teacher": str(args.teacher), "teacher_bytes": Path(args.teacher).stat().st_size,
                    "teacher_sha256": file_sha256(args.teacher)}
    cfg = teacher.config

    def fits(data):  # data of other classes is refused before it is decoded (minutes for 50,000 JPEGs), not after
        return data.require_classes(cfg)
    train = load_split(args.data, "train", cfg.img_size, limit=args.limit, check=fits)
    # a tree's own val/ folder may name other classes: refused now, not after an epoch
    val = load_split(args.data, "val", cfg.img_size, limit=args.val_limit, check=fits) if args.val_limit else None
    data = None  # the split scored at the end, read now: one the data lacks is refused before training, not after
    if args.eval_split:
        data = load_split(args.data, args.eval_split, cfg.img_size, limit=args.eval_limit, check=fits)
    started = time.time()
    student, penalty = prepare_student(teacher, r, train, args.calib_size, args.seed, device, args.bitops_weight,
                                       init)
    features = FeatureDistill(student, teacher, args.feature_weight) if args.feature_weight > 0 else None
    # the nearest whole epoch, a half up (Python's round takes halves to even: 5 epochs searched 2, 7 searched 4)
    search = int(args.epochs * args.search_ratio + 0.5) if searches else 0
    train_cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, seed=args.seed, time_budget=args.time_budget,
        augment=AugmentConfig(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix),
        distill=args.distill, distill_weight=args.distill_weight if args.distill != "none" else 0.0,
        distill_temperature=args.temperature,
        init=_weights_digest(student) if init else "",  # a warm restart never resumes the run it starts from
        extra_loss={"feature_weight": args.feature_weight,  # the penalty weighs only in a searching stage
                    **({"bitops_weight": args.bitops_weight} if search else {})})
    # the limit counts training only: the calibration above, redone by every run, would spend a limit shorter
    # than itself in each rerun and leave none for an epoch, so that rerunning never got past it
    with run_lock(run_dir):
        student, done, epoch_logs = train_stages(student, teacher, r, train, val, train_cfg, run_dir, search,
                                                 penalty, features, args.time_limit, args.device, args.save_every)
    if not done:
        print(f"stopped by --time-limit; rerun the same command to resume from {run_dir}")
        return 0
    train_seconds = sum(e["seconds"] - e.get("first_step_seconds", 0.0) for e in epoch_logs)  # compiling left out

    storage, alloc = freeze_and_save(student, r, args.recipe, args.out, args.float16)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size / 1e6:.3f} MB, quantized linear weights at {storage['bits_per_weight']:.3f} "
          f"bits/weight (scales included)")
    if data is None:
        return 0
    packed = load_quantized(args.out).to(device)   # score the file as users will load it, where it trained
    res = evaluate(packed, data, device=device, progress=True)
    fp = {"top1": _known_teacher_top1(args.results, teacher_file["teacher_sha256"], args.eval_split, res["n"])}
    if fp["top1"] is None:
        fp = evaluate(teacher.to(device), data, device=device, progress=True)
    drop = round(100 * (fp["top1"] - res["top1"]), 4)  # top-1 points, without float noise
    print(f"{args.eval_split} top-1: {res['top1']:.4f} (teacher {fp['top1']:.4f}, drop {drop:.2f} points)")
    if args.results:
        entry = {
            "name": args.name or args.recipe, "recipe": args.recipe, "recipe_fields": dataclasses.asdict(r),
            "top1": res["top1"], "teacher_top1": fp["top1"], "drop_points": drop,
            "split": args.eval_split, "n": res["n"], "size_bytes": size,
            "bits_per_weight": storage["bits_per_weight"], "linear_weights": storage["linear_weights"],
            "float16": args.float16,
            **teacher_file, "file": str(args.out), "init": args.init,
            "epochs": len(epoch_logs), "max_epochs": args.epochs,  # fewer: --time-budget
            "train_images": len(train), "images_per_epoch": len(train),
            "train_seconds": round(train_seconds, 1), "wall_time_s": round(time.time() - started, 1),
            "images_per_s": round(len(epoch_logs) * len(train) / max(train_seconds, 1e-9), 1),
            **provenance("quant.qat", argv),
        }
        if alloc is not None:
            entry.update(budget_bits=r.budget_bits, bitops_ratio=alloc["bitops_ratio"],
                         mean_weight_bits=alloc["mean_weight_bits"], allocation=f"{args.out}.bits.json")
        record_result(args.results, args.name or args.recipe, entry)
        print(f"recorded {args.name or args.recipe} in {args.results}")
    print(f"top1={res['top1']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
