"""DeepZero trainer: ``python -m deepzero_kernels.train`` (Algorithm 2 of the paper).

Pipeline: ZO-GraSP scores at initialisation -> global pruning -> layer-wise densities (LPR) ->
random masks obeying them, redrawn every ``--mask-interval`` epochs -> sparse CGE (or RGE, or
first-order backprop as the baseline) -> SGD with momentum, weight decay, warm-up and a cosine
or step schedule.

Reproducibility: every random choice (init, ZO-GraSP directions, masks, data order,
augmentation, RGE directions) comes from an explicit generator whose state is checkpointed, so
``--resume`` continues bit for bit. Run ``python -m deepzero_kernels.train --help`` for flags.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from .engine import PartialMismatch, PartialRun
from .estimators import CGE, RGE
from .models import ARCHITECTURES, build_model
from .ops import check_mu
from .progress import Progress, hms
from .pruning import layer_densities, prunable_weights, prune_masks, random_masks, zo_grasp_scores
from .runtime import rss_bytes

CHECKPOINT = "checkpoint.pt"
FORMAT = "deepzero_kernels.train/1"
MODELS = ("cnn", "cnn8", *ARCHITECTURES, "mlp")
# Flags that only change speed or display: they may differ when a run is resumed.
RESUME_FREE = {"resume", "out", "progress", "progress_interval", "threads", "device", "backend", "memory_budget",
               "eval_batch_size", "dist_timeout", "check_every", "dry_run", "max_hours"}
# Resume-free flags that still decide float rounding (the backend's kernels, the chunk sizes): a
# resumed run takes the saved values unless the command line gives others.
NUMERICS_FLAGS = ("backend", "memory_budget")
# Flags added after the checkpoint format was fixed: what runs that predate them used.
ADDED_FLAGS = {"delta_precision": "fp32", "base_precision": "model"}
# torchrun settings: flag, else environment variable, else default (see dist_setting)
DIST_ENV = {"dist_timeout": ("DZ_DIST_TIMEOUT", float, 300.0), "check_every": ("DZ_CHECK_EVERY", int, 10)}
# The generators are seeded with seed * 1000 + i (i < 5), which torch takes as a 64-bit number.
SEED_MAX = (2 ** 64 - 5) // 1000
# gloo counts a process group's timeout in nanoseconds as a 64-bit int (at most ~9.2e9 s).
DIST_TIMEOUT_MAX = 1e9

PAPER_RECIPE = ("python -m deepzero_kernels.train --dataset cifar10 --data-dir DIR --model resnet20 "
                "--estimator cge --sparsity 0.9 --sparsity-method zo_grasp --grasp-q 192 --mu 5e-3 "
                "--lr 0.1 --scheduler cosine --warmup-epochs 0 --momentum 0.9 --weight-decay 5e-4 "
                "--batch-size 256 --epochs 50 --mask-interval 5")


# ----------------------------------------------------------------------------- CLI
def _shape(s: str):
    try:
        shape = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 3,32,32, got {s!r}")
    if not shape or any(v < 1 for v in shape):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {s!r}")
    return list(shape)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except for switches and options whose help already explains None."""

    def __init__(self, prog):
        super().__init__(prog, width=100)

    def _get_help_string(self, action):
        if isinstance(action.default, bool) or action.default is None:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A usage error is one line on stderr and exit code 2 (not the 17-line usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The trainer's flags (``suppress_defaults``: only the flags given, for resume checks).
    Length: one ``add_argument`` per flag, in the order ``--help`` shows them; split, the CLI would
    have no single place that defines it."""
    p = _Parser(
        prog="python -m deepzero_kernels.train",
        description="Zeroth-order (DeepZero) training: ZO-GraSP layer densities, sparse CGE with "
                    "random masks redrawn periodically, SGD. The default trains the App. B CNN "
                    "on scikit-learn's digits.",
        epilog="Paper recipe (CIFAR-10, ResNet-20, Sec. 6.1):\n  " + PAPER_RECIPE,
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None)
    d = (lambda v: argparse.SUPPRESS) if suppress_defaults else (lambda v: v)
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=d("digits"),
                   metavar="{digits,cifar10,synthetic,FILE.npz,FILE.pt,DIR,MODULE:FACTORY}",
                   help="your own data: a .npz/.pt file with x_train, y_train, x_test, y_test, an image folder DIR "
                        "(DIR/train/<class>/*.png and DIR/test/<class>/*.png, one size), or "
                        "package.module:factory returning them (see python/examples/own_model_and_data.py); "
                        "digits: sklearn's 8x8 digits (embedded); cifar10: python-format batches in "
                        "--data-dir; synthetic: Gaussian class clusters, see --synthetic-shape")
    g.add_argument("--data-dir", default=d("data"),
                   help="CIFAR-10 directory (cifar-10-batches-py or its parent)")
    g.add_argument("--synthetic-shape", type=_shape, default=d([3, 32, 32]), metavar="C,H,W",
                   help="input shape of the synthetic dataset")
    g.add_argument("--synthetic-size", type=_shape, default=d([512, 256]), metavar="NTRAIN,NTEST",
                   help="train and test sizes of the synthetic dataset")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=d(True),
                   help="disable CIFAR-10's random crop + flip (on by default)")
    g.add_argument("--model", default=d("cnn"), metavar="{" + ",".join(MODELS) + ",MODULE:FACTORY}",
                   help="network: cnn (App. B), mlp, an architecture of deepzero_kernels.models at its "
                        "standard CIFAR size, or your own package.module:factory (called with those of "
                        "num_classes, in_channels, image_size it accepts)")
    g.add_argument("--depth", type=int, default=d(2), help="conv blocks of the App. B CNN")
    g.add_argument("--width", type=int, default=d(16),
                   help="channels of the App. B CNN and of cnn8 (MLP: hidden = 4 x width)")
    g = p.add_argument_group("zeroth-order estimation and sparsity")
    g.add_argument("--estimator", choices=("cge", "rge", "fo"), default=d("cge"),
                   help="cge: coordinate-wise (DeepZero); rge: randomized; fo: backprop baseline")
    g.add_argument("--q", type=int, default=d(0),
                   help="RGE directions per step; 0 = as many as CGE's queries (the paper's Fig. 2 "
                        "comparison, q = d)")
    g.add_argument("--mu", type=float, default=d(5e-3), help="finite-difference step (CGE, RGE, ZO-GraSP)")
    g.add_argument("--sparsity", type=float, default=d(0.5),
                   help="fraction of conv/linear weights NOT estimated per step, in [0, 1)")
    g.add_argument("--sparsity-method", choices=("zo_grasp", "random", "none"), default=d("zo_grasp"),
                   help="layer densities from ZO-GraSP (paper), uniform (random), or dense (none)")
    g.add_argument("--grasp-q", type=int, default=d(192), help="RGE directions used by ZO-GraSP")
    g.add_argument("--mask-interval", type=int, default=d(5),
                   help="redraw the random masks every this many epochs (K_sparse)")
    g.add_argument("--backend", choices=("auto", "torch", "triton", "native"), default=d("auto"),
                   help="fused-op backend of the estimators")
    g.add_argument("--delta-precision", choices=("fp32", "tf32", "bf16"), default=d("fp32"),
                   help="precision of the conv/linear maps CGE applies to perturbation deltas (values always fp32)")
    g.add_argument("--base-precision", choices=("fp64", "model"), default=d("fp64"),
                   help="CGE's base pass, which the deltas are taken around: float64 rounded once to the model's "
                        "dtype (accurate float32 estimates, one extra forward per step) or the model's dtype")
    g.add_argument("--memory-budget", type=int, default=d(None), metavar="BYTES",
                   help="bytes one chunk of CGE perturbations may use (default: engine's choice)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d(30), help="training epochs")
    g.add_argument("--batch-size", type=int, default=d(128), help="training batch size")
    g.add_argument("--eval-batch-size", type=int, default=d(1000), help="evaluation batch size")
    g.add_argument("--lr", type=float, default=d(0.1), help="peak learning rate")
    g.add_argument("--momentum", type=float, default=d(0.9), help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d(5e-4), help="SGD weight decay")
    g.add_argument("--warmup-epochs", type=float, default=d(1.0),
                   help="linear warm-up length in epochs (may be fractional)")
    g.add_argument("--scheduler", choices=("cosine", "step"), default=d("cosine"),
                   help="after warm-up: cosine decay to 0, or x0.1 at 50%% and 75%% of training")
    g.add_argument("--seed", type=int, default=d(0), help="seed of every random generator")
    g = p.add_argument_group("running")
    g.add_argument("--device", default=d("auto"), help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=d(0), help="torch CPU threads (0 = torch's default)")
    g.add_argument("--out", default=d(None), metavar="DIR",
                   help="write config.json, densities.json, metrics.jsonl, metrics.csv, checkpoint.pt, best.pt, "
                        "summary.json, metrics.png, and TensorBoard scalars in DIR/tensorboard when tensorboard is "
                        "installed "
                        "(default: write nothing)")
    g.add_argument("--resume", default=d(None), metavar="DIR",
                   help="continue the run saved in DIR exactly (its config is reused; default: start a new run)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=d(True),
                   help="no progress output (default: a bar on a terminal, a line every --progress-interval "
                        "seconds otherwise)")
    g.add_argument("--progress-interval", type=float, default=d(30.0), metavar="SECONDS",
                   help="seconds between progress lines when stderr is not a terminal (a log file)")
    g.add_argument("--dry-run", action="store_true", default=d(False),
                   help="print the projected cost (a calibration of a few seconds) and exit without training "
                        "or writing anything")
    g.add_argument("--max-hours", type=float, default=d(None), metavar="H",
                   help="refuse to start (exit 2) a run projected to take longer than H hours (default: no limit)")
    g = p.add_argument_group("multi-process (torchrun --nproc_per_node=N -m deepzero_kernels.train ...; CGE only)")
    g.add_argument("--dist-timeout", type=float, default=d(None), metavar="SECONDS",
                   help="a rank that dies or hangs makes the others exit with an error after this "
                        "long (default: $DZ_DIST_TIMEOUT, else 300)")
    g.add_argument("--check-every", type=int, default=d(None), metavar="STEPS",
                   help="compare a checksum of the weights across ranks every this many steps and "
                        "fail on divergence; 0 = never (default: $DZ_CHECK_EVERY, else 10)")
    return p


def validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Range and combination checks: every failure is an argparse error (exit code 2)."""
    def need(ok, msg):
        if not ok:
            p.error(msg)
    finite = lambda v: v is not None and math.isfinite(v)  # noqa: E731
    need(finite(a.sparsity) and 0 <= a.sparsity < 1, f"--sparsity must be in [0, 1), got {a.sparsity}")
    need(finite(a.mu) and a.mu > 0, f"--mu must be > 0, got {a.mu}")
    need(a.max_hours is None or (math.isfinite(a.max_hours) and a.max_hours > 0),
         f"--max-hours must be > 0, got {a.max_hours}")
    need(finite(a.lr) and a.lr > 0, f"--lr must be > 0, got {a.lr}")
    need(finite(a.momentum) and 0 <= a.momentum < 1, f"--momentum must be in [0, 1), got {a.momentum}")
    need(finite(a.weight_decay) and a.weight_decay >= 0, f"--weight-decay must be >= 0, got {a.weight_decay}")
    need(a.epochs >= 1, f"--epochs must be >= 1, got {a.epochs}")
    need(finite(a.warmup_epochs) and 0 <= a.warmup_epochs <= a.epochs,
         f"--warmup-epochs must be in [0, --epochs={a.epochs}], got {a.warmup_epochs}")
    need(a.batch_size >= 1, f"--batch-size must be >= 1, got {a.batch_size}")
    need(a.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {a.eval_batch_size}")
    need(a.mask_interval >= 1, f"--mask-interval must be >= 1, got {a.mask_interval}")
    need(a.q >= 0, f"--q must be >= 0 (0 = q equal to CGE's queries), got {a.q}")
    need(a.grasp_q >= 1, f"--grasp-q must be >= 1, got {a.grasp_q}")
    need(a.depth >= 1, f"--depth must be >= 1, got {a.depth}")
    need(a.width >= 1, f"--width must be >= 1, got {a.width}")
    need(a.threads >= 0, f"--threads must be >= 0, got {a.threads}")
    need(a.memory_budget is None or a.memory_budget > 0, f"--memory-budget must be > 0, got {a.memory_budget}")
    need(0 <= a.seed <= SEED_MAX, f"--seed must be in [0, {SEED_MAX}] (seed * 1000 + i seeds 64-bit "
                                  f"generators), got {a.seed}")
    for key in DIST_ENV:
        try:
            v = dist_setting(vars(a), key)
        except ValueError as e:
            p.error(str(e))
        need(finite(v) and 0 < v <= DIST_TIMEOUT_MAX if key == "dist_timeout" else v >= 0,
             f"--{key.replace('_', '-')} must be "
             f"{f'in (0, {DIST_TIMEOUT_MAX:g}] seconds' if key == 'dist_timeout' else '>= 0'}, got {v}")
    need(not (a.sparsity > 0 and a.sparsity_method == "none"),
         f"--sparsity {a.sparsity} with --sparsity-method none: use --sparsity 0 for dense training "
         f"or pick zo_grasp/random")
    need(not (os.path.isdir(a.dataset) and not D.is_image_folder(a.dataset)),
         f"--dataset {a.dataset}: an image folder must hold train/ and test/ folders with one folder per class")
    for flag in ("model", "dataset"):
        valid, what = _NAMED_FIELDS[flag]
        need(valid(getattr(a, flag)), f"--{flag}: invalid choice {getattr(a, flag)!r} (choose {what})")
    for flag, spec in (("--model", a.model), ("--dataset", a.dataset)):
        if ":" in spec:
            from .runtime import import_object
            try:
                import_object(spec)
            except ValueError as e:
                p.error(f"{flag}: {e}")
    if a.dataset == "synthetic":
        need(len(a.synthetic_size) == 2, "--synthetic-size takes two numbers: NTRAIN,NTEST")
    if a.model.startswith("resnet") or a.model == "cnn":
        shape = a.synthetic_shape if a.dataset == "synthetic" else None
        need(shape is None or len(shape) == 3, f"--model {a.model} needs a C,H,W --synthetic-shape, got "
                                               f"{','.join(map(str, shape or []))}")
    if a.model == "mlp" and a.dataset == "synthetic":
        need(len(a.synthetic_shape) == 3, "--model mlp with synthetic data needs a C,H,W --synthetic-shape")
    if a.device != "auto":
        try:
            dev = torch.device(a.device)
        except RuntimeError:
            p.error(f"--device: not a device: {a.device!r}")
        need(dev.type in ("cpu", "cuda"), f"--device {a.device}: unsupported device type {dev.type!r}; "
                                          f"use auto, cpu, cuda or cuda:N")
        need(dev.type != "cuda" or torch.cuda.is_available(), f"--device {a.device}: CUDA is not available")
        need(dev.type != "cuda" or dev.index is None or dev.index < torch.cuda.device_count(),
             f"--device {a.device}: there are {torch.cuda.device_count()} CUDA devices")
    if a.estimator in ("cge", "rge") and a.backend != "auto":
        from .ops import resolve_backend
        try:
            resolve_backend(a.backend, resolve_device(a.device))
        except ValueError as e:
            p.error(f"--backend {a.backend}: {e}")
    if a.out is not None and not a.dry_run:  # a dry run writes nothing, so --out is not created
        problem = out_dir_problem(a.out)
        need(problem is None, f"--out {a.out}: {problem}")


def out_dir_problem(path: str) -> Optional[str]:
    """Why run files cannot be written to ``path`` (None if they can). Creates the directory and
    writes a probe file, so a read-only or misplaced ``--out`` fails before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a directory"
    probe = os.path.join(path, f".write-test.{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        return f"not writable ({e.strerror or e})"
    return None


DATASETS = ("digits", "cifar10", "synthetic")
# Flags that take a name from a list or a user's spec (no argparse choices): how to check a saved value.
_NAMED_FIELDS = {
    "model": (lambda v: v in MODELS or ":" in v, "one of " + ", ".join(MODELS) + " or package.module:factory"),
    "dataset": (lambda v: v in DATASETS or ":" in v or v.endswith((".npz", ".pt")) or D.is_image_folder(v),
                "one of " + ", ".join(DATASETS) + ", a .npz/.pt file, an image folder or package.module:factory"),
}


def config_type_problem(p: argparse.ArgumentParser, cfg: dict) -> Optional[str]:
    """The first field of a saved config whose value does not have its flag's type, or None."""
    for act in p._actions:
        k = act.dest
        if k not in cfg or act.default is argparse.SUPPRESS:
            continue
        v = cfg[k]
        integer = lambda u: isinstance(u, int) and not isinstance(u, bool)  # noqa: E731
        if v is None and act.default is None:
            continue
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            ok, what = isinstance(v, bool), "true or false"
        elif act.type is int:
            ok, what = integer(v), "an integer"
        elif act.type is float:
            ok, what = integer(v) or isinstance(v, float), "a number"
        elif act.type is _shape:
            ok, what = isinstance(v, list) and bool(v) and all(integer(u) and u >= 1 for u in v), "a list of sizes >= 1"
        else:
            ok, what = isinstance(v, str), "a string"
        if ok and act.choices is not None and v not in act.choices:
            ok, what = False, "one of " + ", ".join(map(str, act.choices))
        if ok and k in _NAMED_FIELDS and not _NAMED_FIELDS[k][0](v):
            ok, what = False, _NAMED_FIELDS[k][1]
        if not ok:
            return f"field {k!r} must be {what}, got {v!r}"
    return None


def parse_args(argv=None):
    """Parse and validate; with ``--resume`` the saved config is loaded and explicit flags
    must agree with it (except speed/display flags). Returns ``(config dict, parser)``."""
    p = build_parser()
    a = p.parse_args(argv)
    if a.resume is not None:
        explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
        if a.out is not None and os.path.abspath(a.out) != os.path.abspath(a.resume):
            p.error(f"--out {a.out} differs from --resume {a.resume}: a resumed run writes to its own directory")
        try:
            saved, numerics = load_config(a.resume)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        problem = config_type_problem(p, saved)
        if problem:
            p.error(f"--resume {a.resume}: config.json is corrupt ({problem})")
        for k, v in explicit.items():
            if k in RESUME_FREE:
                continue
            if k == "epochs" and isinstance(saved.get(k), int) and v > saved[k]:
                continue  # extends the run (run() recomputes the lr schedule for the new length)
            if k in saved and saved[k] != v:
                p.error(f"--{k.replace('_', '-')} {v} differs from the run being resumed "
                        f"({saved[k]}); a resumed run keeps its configuration")
        merged = {**ADDED_FLAGS, **saved}
        merged.update({k: v for k, v in vars(a).items() if k in RESUME_FREE})
        merged.update(numerics)  # the run's own backend and budget, unless given now
        merged.update({k: v for k, v in explicit.items() if k in RESUME_FREE})
        if isinstance(saved.get("epochs"), int) and explicit.get("epochs", 0) > saved["epochs"]:
            merged["epochs"] = explicit["epochs"]  # extends the run
        merged["out"] = a.resume
        a = argparse.Namespace(**{**vars(a), **merged})
    validate(p, a)
    cfg = vars(a)
    if cfg["sparsity"] == 0:
        cfg["sparsity_method"] = "none"
    return cfg, p


def dist_setting(cfg: dict, key: str):
    """``--dist-timeout`` / ``--check-every``: the flag if given, else its environment variable
    (kept from before the flags existed), else the default."""
    env, typ, default = DIST_ENV[key]
    if cfg.get(key) is not None:
        return cfg[key]
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        v = typ(raw)
    except ValueError:
        raise ValueError(f"${env}={raw!r} is not a valid {typ.__name__}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"${env}={raw!r} is not finite")
    return v


def load_config(run_dir: str) -> tuple:
    """``(config, numerics)`` of a saved run: its training config and the NUMERICS_FLAGS it was
    started with (``derived.flags``; {} for runs that predate them)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"--resume {run_dir}: no such directory")
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        raise FileNotFoundError(f"--resume {run_dir}: no {CHECKPOINT} there (nothing to resume)")
    try:
        with open(path) as f:
            doc = json.load(f)
        cfg = doc["config"]
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume {run_dir}: config.json is missing")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume {run_dir}: config.json is corrupt ({e})")
    if not isinstance(cfg, dict):
        raise ValueError(f"--resume {run_dir}: config.json is corrupt (config is not an object)")
    flags = doc.get("derived", {}).get("flags", {}) if isinstance(doc.get("derived"), dict) else {}
    return cfg, {k: flags[k] for k in NUMERICS_FLAGS if isinstance(flags, dict) and k in flags}


# ----------------------------------------------------------------------------- pieces
class LRSchedule:
    """Multiplier of the peak lr at optimizer step ``t`` (per step, so warm-up is smooth).
    A plain object (not a lambda) so LambdaLR's state_dict stores it."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int):
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        rest = max(1, self.total_steps - self.warmup_steps)
        frac = min(1.0, (t - self.warmup_steps) / rest)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_model(cfg, ds: D.Dataset, seed: bool = True) -> nn.Module:
    if seed:
        torch.manual_seed(cfg["seed"])  # model init is the only user of the global RNG
    return build_model(cfg["model"], in_channels=ds.in_channels, num_classes=ds.num_classes,
                       image_size=ds.image_size, depth=cfg["depth"], width=cfg["width"])


def memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the machine's RAM (unbounded where unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return 1 << 62


def check_sizes(cfg, ds: D.Dataset, device: torch.device) -> None:
    """Refuse, before allocating anything, a configuration whose model or random directions
    cannot fit in memory (a lower bound of what the run allocates: float32 weights, gradients
    and momentum on ``device``; RGE's and ZO-GraSP's float64 directions on the CPU)."""
    def gb(n):
        return f"{n / 2 ** 30:,.1f} GiB"
    if ":" in cfg["model"]:  # a user's factory: built for real (it need not support the meta device)
        try:
            model = make_model(cfg, ds, seed=False)
        except Exception as e:
            raise UsageError(f"--model {cfg['model']}: the factory failed ({type(e).__name__}: {e})") from None
    else:
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated
                model = make_model(cfg, ds, seed=False)
        except (RuntimeError, ValueError, OverflowError) as e:
            raise UsageError(f"--model {cfg['model']} --width {cfg['width']} --depth {cfg['depth']}: cannot be "
                            f"built ({e})") from None
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = dict(model.named_parameters())
    n_prunable = sum(params[k].numel() for k in prunable_weights(model))
    dev_mem, ram = memory_bytes(device), memory_bytes(torch.device("cpu"))
    if 3 * 4 * n > dev_mem:
        raise UsageError(f"--model {cfg['model']} --width {cfg['width']} --depth {cfg['depth']}: {n:,} parameters "
                        f"need {gb(12 * n)} for weights, gradients and momentum, more than the {gb(dev_mem)} "
                        f"of {device.type} memory")
    if cfg["estimator"] == "rge":
        q = cfg["q"] or (n - n_prunable) + round((1 - cfg["sparsity"]) * n_prunable)  # 0: as many as CGE's
        if 8 * q * n > ram:
            raise UsageError(f"--q {cfg['q']}: {q:,} RGE directions over {n:,} parameters need {gb(8 * q * n)}, "
                            f"more than the {gb(ram)} of memory" + ("; pass a smaller --q" if not cfg["q"] else ""))
    if cfg["sparsity_method"] == "zo_grasp" and cfg.get("resume") is None:
        if 8 * cfg["grasp_q"] * n_prunable > ram:
            raise UsageError(f"--grasp-q {cfg['grasp_q']}: ZO-GraSP's directions over {n_prunable:,} weights need "
                            f"{gb(8 * cfg['grasp_q'] * n_prunable)}, more than the {gb(ram)} of memory")


def has_running_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


def generators(seed: int) -> dict:
    # Separate streams so that, e.g., changing the estimator does not change the data order.
    return {k: torch.Generator().manual_seed(seed * 1000 + i)
            for i, k in enumerate(("data", "aug", "mask", "est", "grasp"))}


def atomic_write_bytes(path: str, write) -> None:
    """Write via a temporary file in the same directory, fsync, then ``os.replace``: a crash
    leaves either the old or the new file, never a truncated one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only, ...: name the file, not the temporary
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


class CheckpointError(RuntimeError):
    pass


class TrainingDiverged(RuntimeError):
    """A loss, gradient or weight became nan/inf; the last good checkpoint is kept."""


class UsageError(ValueError):
    """A flag that cannot work with this data or model, found before training (exit code 2)."""


_NUM, _INT, _NONE = (int, float), int, type(None)
# Field types of a checkpoint (load_checkpoint refuses anything else with the field's name).
_CHECKPOINT_FIELDS = {"config": dict, "model": dict, "optimizer": dict, "scheduler": dict,
                      "masks": (dict, _NONE), "densities": (dict, _NONE), "grasp": dict, "rng": dict,
                      "state": dict}
_STATE_FIELDS = {"epoch": _INT, "step": _INT, "perm": (torch.Tensor, _NONE), "history": list, "best_acc": _NUM,
                 "best_epoch": _INT, "elapsed": _NUM, "perturbations": _INT, "forwards": _INT, "ep": dict}
_EPOCH_FIELDS = {"loss": _NUM, "correct": _INT, "n": _INT, "seconds": _NUM, "perturbations": _INT}


def checkpoint_problem(ck: dict) -> Optional[str]:
    """The first field of a checkpoint that is missing or has the wrong type, or None."""
    def bad(where, obj, fields):
        for k, t in fields.items():
            if k not in obj:
                return f"{where}{k} is missing"
            if isinstance(obj[k], bool) or not isinstance(obj[k], t):
                return f"{where}{k} has type {type(obj[k]).__name__}"
        return None
    why = bad("", ck, _CHECKPOINT_FIELDS) or bad("state.", ck["state"], _STATE_FIELDS) \
        or bad("state.ep.", ck["state"]["ep"], _EPOCH_FIELDS)
    if why:
        return why
    for k, m in (ck["masks"] or {}).items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            return f"masks[{k!r}] is not a bool tensor"
    for k, v in (ck["densities"] or {}).items():
        if isinstance(v, bool) or not isinstance(v, _NUM):
            return f"densities[{k!r}] has type {type(v).__name__}"
    for k, v in ck["rng"].items():
        if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8:
            return f"rng[{k!r}] is not a generator state (uint8 tensor)"
    if not all(isinstance(h, dict) for h in ck["state"]["history"]):
        return "state.history holds a non-record"
    if ck.get("partial") is not None and ck["state"]["perm"] is None:
        return "a partial step without the epoch's data order (state.perm)"
    return None


def load_checkpoint(run_dir: str, cfg: dict) -> dict:
    path = os.path.join(run_dir, CHECKPOINT)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                              f"it was left untouched") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} checkpoint (format "
                              f"{ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r})")
    problem = checkpoint_problem(ck)
    if problem:
        raise CheckpointError(f"checkpoint {path} is corrupt ({problem}); it was left untouched")
    saved = {**ADDED_FLAGS, **ck.get("config", {})}
    extends = isinstance(saved.get("epochs"), int) and isinstance(cfg.get("epochs"), int) \
        and cfg["epochs"] > saved["epochs"]
    diff = {k: (saved.get(k), cfg.get(k)) for k in set(saved) | set(cfg)
            if k not in RESUME_FREE and saved.get(k) != cfg.get(k) and not (k == "epochs" and extends)}
    if diff:
        raise CheckpointError(f"checkpoint {path} does not match {run_dir}/config.json: "
                              + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in sorted(diff.items())))
    return ck


# ----------------------------------------------------------------------------- training
def _on_step_end(epoch: int, step: int) -> None:
    """Hook called at every step boundary (tests raise KeyboardInterrupt here)."""


def _on_tick(where: str) -> None:
    """Hook called at every point where a first Ctrl-C stops a run: ``"calibration"`` (after a
    chunk of the cost calibration), ``"grasp"`` (after a chunk of ZO-GraSP queries), ``"chunk"``
    (after a chunk of a step's perturbations), ``"eval"`` (after an evaluation batch). Tests send
    Ctrl-C from here."""


class _Interrupts:
    """Ctrl-C during a run. The first one stops at the next of these points, seconds away at
    most: a chunk of a step's perturbations (the finished chunks are checkpointed and the step
    continues from them on ``--resume``), a ZO-GraSP chunk, an evaluation batch, a step boundary.
    A second Ctrl-C raises KeyboardInterrupt at once; the run then saves what is consistent."""

    def __init__(self):
        self.requested = False
        self.old = None

    def __enter__(self):
        try:
            self.old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: keep the default behaviour
            self.old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping within seconds and saving (press again to abort at once)", file=sys.stderr)

    def check(self, where: str) -> None:
        _on_tick(where)
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


@torch.no_grad()
def evaluate(model, ds: D.Dataset, batch_size: int, device, *, progress=None, check=None) -> tuple:
    """Test loss and accuracy in eval mode. ``progress``: a :class:`Progress` over the test
    samples; ``check()`` is called after every batch (a Ctrl-C stops there)."""
    was = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, ds.x_test.shape[0]
    try:
        for idx in D.batches(n, batch_size, shuffle=False):
            x = ds.prepare(ds.x_test[idx].to(device), train=False)
            y = ds.y_test[idx].to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            if progress is not None:
                progress.update(len(idx))
            if check is not None:
                check()
    finally:
        model.train(was)
    return loss_sum / n, correct / n


def _log(msg: str, progress: bool) -> None:
    if progress:
        from tqdm import tqdm
        tqdm.write(msg)
    else:
        print(msg, flush=True)


def _gib(n) -> str:
    return "?" if n is None else f"{n / (1 << 30):.2f}G"


def _run_eta(rc: "_Run", state: "TrainState", step_fraction: float = 0.0) -> str:
    """Time left for the whole run, from the steps done in this process (evaluation included) and
    the fraction of the current step done."""
    done = state.epoch * rc.steps_per_epoch + state.step + step_fraction - rc.steps_at_start
    spent = time.perf_counter() - rc.t_start - rc.elapsed_at_start
    left = rc.total_steps - state.epoch * rc.steps_per_epoch - state.step - step_fraction
    return hms(spent / done * left) if done > 0 else "?"


class _StepProgress:
    """``on_chunk`` callback of a step's estimate: shows the perturbations done in the step (a
    ResNet-20 step takes minutes) and the epoch's rate in the epoch's progress, and lets a Ctrl-C
    stop after the chunk."""

    def __init__(self, rc: "_Run", state: "TrainState", bar, total: int, done: int = 0):
        self.rc, self.state, self.bar, self.total, self.n = rc, state, bar, total, done
        self.t0 = time.perf_counter()

    def __call__(self, *args):
        self.n += args[-1]  # CGE calls (name, k), RGE (k,)
        if self.bar.due():
            ep = self.state.ep
            rate = (ep["perturbations"] + self.n) / max(ep["seconds"] + time.perf_counter() - self.t0, 1e-9)
            self.bar.note(f"step {self.state.step + 1}: {self.n}/{self.total} perturbations, {rate:,.0f} pert/s, "
                          f"run ETA {_run_eta(self.rc, self.state, self.n / max(self.total, 1))}, "
                          f"rss {_gib(rss_bytes())}")
        self.rc.interrupts.check("chunk")


def setup_summary(cfg: dict, device: torch.device) -> str:
    """The first line of a run: backend, device, threads and memory budget in use."""
    from .runtime import thread_settings
    if cfg["estimator"] == "fo" and cfg["sparsity_method"] != "zo_grasp":
        backend = "none (first-order backprop)"
    else:
        from .kernels import available
        from .ops import resolve_backend
        try:
            name = resolve_backend(cfg["backend"], device)  # may build the native kernels (first use)
            why = "" if name == "torch" else f"; {available(device)[name][1]}"
            if name == "native" and device.type == "cpu":
                import deepzero_kernels._native as nat
                why += f", {nat.cpu_isa()}"
            backend = f"{name} (--backend {cfg['backend']}{why})"
        except ValueError as e:
            backend = f"{cfg['backend']}: {e}"
    budget = cfg.get("memory_budget")
    if budget:
        budget_s = f"{budget / (1 << 30):.2f} GiB per chunk (--memory-budget)"
    else:
        try:
            from .engine import default_memory_budget
            budget_s = f"{default_memory_budget(device) / (1 << 30):.2f} GiB per chunk (engine default)"
        except (ImportError, RuntimeError):
            budget_s = "engine default"
    rss = rss_bytes()
    return (f"backend {backend}; device {device}; threads: {thread_settings()}; memory budget {budget_s}"
            + (f"; resident {rss / (1 << 30):.2f} GiB" if rss else ""))


# ----------------------------------------------------------------------------- the run, in parts
def _new_epoch_stats() -> dict:
    return {"loss": 0.0, "correct": 0, "n": 0, "seconds": 0.0, "perturbations": 0}


@dataclass
class TrainState:
    """Everything a checkpoint carries: the objects that are restored in place (model, optimizer,
    lr schedule, generators, masks, densities, ZO-GraSP info) and the run's position and counters
    (the checkpoint's ``state`` entry, keys :data:`COUNTERS`). ``from_checkpoint(to_checkpoint())``
    continues the run bit for bit; the keys are those of checkpoints written before this class."""
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gens: dict
    masks: Optional[dict] = None
    densities: Optional[dict] = None
    grasp: dict = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    perm: Optional[torch.Tensor] = None  # this epoch's data order (None between epochs)
    history: list = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    elapsed: float = 0.0
    perturbations: int = 0
    forwards: int = 0
    ep: dict = field(default_factory=_new_epoch_stats)  # the current epoch's running sums
    partial: Optional[PartialRun] = None  # the current step's finished chunks (CGE, mid-step)

    COUNTERS = tuple(_STATE_FIELDS)

    def rng_state(self) -> dict:
        return {**{k: g.get_state() for k, g in self.gens.items()}, "torch": torch.get_rng_state()}

    def to_checkpoint(self, config: dict, step_start_rng: Optional[dict] = None) -> dict:
        """The checkpoint at a step boundary, or (``step_start_rng``: the generators before the
        step drew its batch) in the middle of a step, with the step's finished chunks: the model
        and optimizer are those of the step's start, so ``--resume`` redraws the same batch and
        continues the step from its chunks."""
        mid = step_start_rng is not None
        return {"format": FORMAT, "config": config, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "masks": None if self.masks is None else {k: v.cpu() for k, v in self.masks.items()},
                "densities": self.densities, "grasp": self.grasp,
                "rng": step_start_rng if mid else self.rng_state(),
                "state": {k: getattr(self, k) for k in self.COUNTERS},
                "partial": self.partial.state_dict() if mid and self.partial is not None else None}

    @classmethod
    def from_checkpoint(cls, ck: dict, model, opt, sched, gens: dict, device) -> "TrainState":
        """Load ``ck`` (as :func:`load_checkpoint` returns it) into freshly built ``model``,
        ``opt``, ``sched`` and ``gens`` (and torch's global RNG). Raises KeyError, RuntimeError,
        ValueError or TypeError when they do not fit the checkpoint."""
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        for k, g in gens.items():
            g.set_state(ck["rng"][k])
        torch.set_rng_state(ck["rng"]["torch"])
        masks = None if ck["masks"] is None else {k: v.to(device) for k, v in ck["masks"].items()}
        partial = PartialRun.from_state_dict(ck["partial"]) if ck.get("partial") is not None else None
        return cls(model, opt, sched, gens, masks, ck["densities"], ck["grasp"],
                   **{k: ck["state"][k] for k in cls.COUNTERS}, partial=partial)


class Checkpointer:
    """The checkpoint of a run directory. Writes are atomic (:func:`atomic_write_bytes`), so the
    file there is always the last good checkpoint; loads are checked field by field and raise
    :class:`CheckpointError`. Writes nothing without ``out_dir`` or when not ``enabled``
    (torchrun ranks other than 0)."""

    def __init__(self, out_dir: Optional[str], enabled: bool = True):
        self.out_dir = out_dir
        self.enabled = out_dir is not None and enabled
        self.path = None if out_dir is None else os.path.join(out_dir, CHECKPOINT)
        self.written = False  # by this process

    def load(self, config: dict) -> dict:
        return load_checkpoint(self.out_dir, config)

    def claim(self) -> None:
        """A fresh run: refuse a directory that already holds a run, create it otherwise."""
        if not self.enabled:
            return
        if os.path.exists(self.path):
            raise CheckpointError(f"--out {self.out_dir} already holds a run ({CHECKPOINT}); resume it with "
                                  f"--resume {self.out_dir} or choose another directory")
        os.makedirs(self.out_dir, exist_ok=True)

    def save(self, state: TrainState, config: dict, step_start_rng: Optional[dict] = None) -> None:
        """Write the checkpoint (see :meth:`TrainState.to_checkpoint`)."""
        if self.enabled:
            ck = state.to_checkpoint(config, step_start_rng)
            atomic_write_bytes(self.path, lambda f: torch.save(ck, f))
            self.written = True

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            atomic_write_text(os.path.join(self.out_dir, name), text)

    def save_best(self, state: "TrainState", record: dict) -> None:
        """``best.pt``: the weights (and buffers) of the epoch with the best test accuracy so far."""
        if self.enabled:
            best = {"model": state.model.state_dict(), "epoch": record["epoch"], "test_acc": record["test_acc"],
                    "test_loss": record["test_loss"]}
            atomic_write_bytes(os.path.join(self.out_dir, "best.pt"), lambda f: torch.save(best, f))

    def kept(self) -> str:
        """What a failed run leaves behind (for its error message)."""
        if self.path and os.path.isfile(self.path):
            return f"the last good checkpoint {self.path} is kept"
        return "no checkpoint was written"


class Scalars:
    """TensorBoard scalars in ``out_dir/tensorboard`` when the ``tensorboard`` package is installed
    (``torch.utils.tensorboard``); otherwise, or without ``--out``, nothing. Steps are counted over
    the whole run, so a resumed run continues the curves."""

    def __init__(self, out_dir: Optional[str], enabled: bool, log):
        self.writer = None
        if out_dir is None or not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("TensorBoard logs: off (pip install tensorboard to get them)")
            return
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        log(f"TensorBoard logs: tensorboard --logdir {os.path.join(out_dir, 'tensorboard')}")

    def add(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class _Run:
    """What the parts of a run share (wired by :func:`run`)."""
    cfg: dict
    semantic: dict  # the config a checkpoint records (without RESUME_FREE flags)
    device: torch.device
    ds: D.Dataset
    est: object  # CGE, DistributedCGE, RGE, or None (first-order backprop)
    ckpt: Checkpointer
    log: object
    progress: bool
    dist_on: bool
    steps_per_epoch: int
    total_steps: int
    bn_forward: bool  # estimation leaves BN running stats alone: one plain forward updates them
    d_active: Optional[int] = None  # coordinates CGE estimates per step
    interrupts: object = None  # _Interrupts: Ctrl-C handling
    scalars: Optional[Scalars] = None  # TensorBoard
    t_start: float = 0.0
    elapsed_at_start: float = 0.0  # the run's time before this process (resumed runs)
    steps_at_start: int = 0  # steps done before this process
    # What an interrupt may save: True at step boundaries and during evaluation (the whole state);
    # step_start_rng is set while a step only estimates (model, optimizer untouched): the state of
    # the step's start with its finished chunks. Neither: the last written checkpoint stands.
    consistent: bool = True
    step_start_rng: Optional[dict] = None
    reported: bool = False  # the engine's report (fallback nodes) was printed, after the first step


@dataclass
class StepStats:
    """What :func:`train_step` reports about one optimizer step."""
    loss: float
    correct: int
    n: int
    perturbations: int
    forwards: int  # forward-equivalents (backprop counts 3)
    rank_seconds: Optional[list] = None  # torchrun: every rank's estimation time


def _start_distributed(cfg: dict) -> tuple:
    """torchrun (WORLD_SIZE > 1, CGE only): join the process group. Returns ``(on, rank,
    own_group)``; rank 0 alone writes files and prints."""
    if not (int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg["estimator"] == "cge"):
        return False, 0, False
    import torch.distributed as tdist
    from .distributed import init_from_env
    own_group = not tdist.is_initialized()
    init_from_env(dist_setting(cfg, "dist_timeout"))
    return True, tdist.get_rank(), own_group


def build_optimizer(cfg: dict, model: nn.Module, steps_per_epoch: int) -> tuple:
    """SGD with momentum and weight decay, and its per-step warm-up + cosine/step schedule."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, LRSchedule(cfg["scheduler"], round(cfg["warmup_epochs"] * steps_per_epoch),
                        steps_per_epoch * cfg["epochs"]))
    return opt, sched


def _check_mu_flag(cfg: dict, model: nn.Module) -> None:
    """``--mu`` too small for the weights' resolution is a usage error (where --mu is used)."""
    if cfg["estimator"] != "fo" or cfg["sparsity_method"] == "zo_grasp":
        try:
            check_mu(cfg["mu"], dict(model.named_parameters()))
        except ValueError as e:
            raise UsageError(f"--mu {cfg['mu']:g}: {e}") from None


def choose_densities(cfg: dict, model: nn.Module, ds: D.Dataset, gens: dict, device, log=None, *,
                     progress: Optional[Progress] = None, check=None) -> tuple:
    """Layer densities of ``--sparsity-method`` (None when dense) and ZO-GraSP's cost. ZO-GraSP
    scores one training batch drawn from its own generator (paper: q = 192, the same mu);
    ``progress`` counts its 2q perturbed queries, ``check()`` runs after every chunk of them."""
    if cfg["sparsity_method"] == "none":
        return None, {}
    if cfg["sparsity_method"] == "random":
        return {n: 1.0 - cfg["sparsity"] for n in prunable_weights(model)}, {}
    idx = torch.randperm(ds.x_train.shape[0], generator=gens["grasp"])[:cfg["batch_size"]]
    xb = ds.prepare(ds.x_train[idx].to(device), train=False)
    t0 = time.perf_counter()
    if log is not None:
        log(f"ZO-GraSP: scoring {len(prunable_weights(model))} weight tensors with {cfg['grasp_q']} random "
            f"directions ({2 * cfg['grasp_q'] + 2} queries on one batch of {xb.shape[0]}) ...")

    def on_chunk(k):
        if progress is not None:
            progress.update(k)
        if check is not None:
            check()
    scores = zo_grasp_scores(model, xb, ds.y_train[idx].to(device), q=cfg["grasp_q"], mu=cfg["mu"],
                             generator=gens["grasp"], on_chunk=on_chunk)
    densities = layer_densities(prune_masks(scores, cfg["sparsity"]))
    seconds = time.perf_counter() - t0
    if log is not None:
        log(f"ZO-GraSP: done in {_duration(seconds)}")
    return densities, {"seconds": seconds, "queries": 2 * cfg["grasp_q"] + 2}


def _densities(cfg, model, ds, gens, device, log, progress: bool, interrupts) -> tuple:
    """:func:`choose_densities` with its progress bar and Ctrl-C checks."""
    queries = 2 * cfg["grasp_q"] if cfg["sparsity_method"] == "zo_grasp" else 0
    with Progress(queries, "ZO-GraSP", unit="perturbed queries", enabled=progress and queries > 0,
                  interval=cfg.get("progress_interval", 30.0)) as bar:
        return choose_densities(cfg, model, ds, gens, device, log, progress=bar,
                                check=lambda: interrupts.check("grasp"))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# Up to this many active coordinates the calibration is one whole step; above, a sample of 256
# (sized to a few seconds on ResNet-20 on 2 cores), whose smaller chunks make the projection an
# upper estimate (measured: ~4x for the App. B CNN at 256 of its 1378 coordinates).
_CALIBRATION_FULL_STEP = 4096
_CALIBRATION_PERTURBATIONS = 256


def project_cost(cfg: dict, model: nn.Module, ds: D.Dataset, device, densities: Optional[dict], *,
                 steps: int, epochs: int, grasp: bool, check=None) -> dict:
    """The run's cost before any work, from a calibration on one training batch: CGE estimates one
    step's active coordinates (above 4096 of them, a sample of 256 in proportion to each layer's
    active count: an upper estimate), RGE and backprop time forwards. Returns seconds per step, per epoch (evaluation included), for the
    ``steps`` steps and ``epochs`` evaluations left, and for ZO-GraSP when it still has to run.
    Draws nothing from the run's generators and leaves parameters and buffers as they were."""
    from .functional import preserved_buffers
    bs = min(cfg["batch_size"], ds.x_train.shape[0])
    x = ds.prepare(ds.x_train[:bs].to(device), train=False)
    y = ds.y_train[:bs].to(device)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    active = {n: round(densities[n] * p.numel()) if densities and n in densities else p.numel()
              for n, p in params.items()}
    d_active = sum(active.values())
    with preserved_buffers(model), torch.no_grad():
        model(x)  # warm-up (allocator, kernels)
        t_fwd = _timed(lambda: model(x))
    out = {"queries_per_step": d_active, "forward_s": t_fwd}
    est = cfg["estimator"]
    if est == "cge":
        cge = CGE(model, mu=cfg["mu"], backend=cfg["backend"], memory_budget=cfg["memory_budget"],
                  delta_precision=cfg.get("delta_precision", "fp32"), base_precision=cfg.get("base_precision", "model"))
        g = torch.Generator().manual_seed(0)
        frac = 1.0 if d_active <= _CALIBRATION_FULL_STEP else _CALIBRATION_PERTURBATIONS / d_active
        masks, n_cal = {}, 0
        for n, p in params.items():
            m = torch.zeros(p.numel(), dtype=torch.bool)
            k = min(active[n], max(1, round(frac * active[n]))) if active[n] else 0
            m[torch.randperm(p.numel(), generator=g)[:k]] = True
            masks[n], n_cal = m.view(p.shape).to(p.device), n_cal + k
        one = {n: torch.zeros_like(m) for n, m in masks.items()}
        for n in one:
            one[n].view(-1)[0] = True
        cge.estimate(x, y, one)  # traces the model, builds kernels: not part of a step
        t_cal = _timed(lambda: cge.estimate(x, y, masks, on_chunk=None if check is None else lambda n, k: check()))
        out.update(calibration_perturbations=n_cal, calibration_s=t_cal, pert_per_s=n_cal / t_cal,
                   step_s=t_cal * d_active / max(n_cal, 1))
    elif est == "rge":
        q = cfg["q"] or d_active
        out.update(queries_per_step=q, step_s=(q + 1) * t_fwd)
    else:
        model.zero_grad(set_to_none=True)
        with preserved_buffers(model):
            t_fo = _timed(lambda: F.cross_entropy(model(x), y).backward())
        model.zero_grad(set_to_none=True)
        out.update(queries_per_step=0, step_s=t_fo)
    n_test = ds.x_test.shape[0]
    out["eval_s"] = t_fwd * math.ceil(n_test / bs)
    out["epoch_s"] = out["step_s"] * math.ceil(ds.x_train.shape[0] / cfg["batch_size"]) + out["eval_s"]
    out["grasp_s"] = (2 * cfg["grasp_q"] + 2) * t_fwd if grasp else 0.0
    out["run_s"] = out["step_s"] * steps + out["eval_s"] * epochs + out["grasp_s"]
    return out


def describe_cost(c: dict, steps: int, epochs: int) -> str:
    rate = (f"calibration: {c['calibration_perturbations']} perturbations in {c['calibration_s']:.2f} s "
            f"({c['pert_per_s']:,.0f}/s); " if "pert_per_s" in c else "")
    grasp = f" (ZO-GraSP ~{_duration(c['grasp_s'])} included)" if c["grasp_s"] else ""
    queries = f"{c['queries_per_step']:,} queries/step" if c["queries_per_step"] else "backprop"
    return (f"cost: {queries}; {rate}projected {_duration(c['step_s'])}/step, "
            f"{_duration(c['epoch_s'])}/epoch, {_duration(c['run_s'])} for {steps} steps in {epochs} "
            f"epochs{grasp}")


def _duration(seconds: float) -> str:
    """``0.27 s``, ``12.3 s``, ``1:02:03`` or ``3.2 days``: readable at every scale."""
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3 * 86400:
        return hms(seconds)
    return f"{seconds / 86400:.1f} days"


def _check_cost(rc_log, cfg: dict, model, ds, device, densities, *, steps: int, epochs: int, grasp: bool,
                dist_on: bool, check=None) -> None:
    """Print the projected cost; refuse a run over ``--max-hours`` (usage error, exit 2)."""
    if dist_on:
        if cfg.get("max_hours"):
            raise UsageError("--max-hours is not supported under torchrun (the projection calibrates one process)")
        return
    c = project_cost(cfg, model, ds, device, densities, steps=steps, epochs=epochs, grasp=grasp, check=check)
    rc_log(describe_cost(c, steps, epochs))
    h = cfg.get("max_hours")
    if h and c["run_s"] > 3600 * h:
        raise UsageError(f"the run is projected to take {_duration(c['run_s'])} ({c['run_s'] / 3600:.3g} h), over "
                         f"--max-hours {h:g}; lower --epochs, --batch-size, the model size or the active coordinates "
                         f"(--sparsity), or raise --max-hours")


def build_estimator(cfg: dict, model: nn.Module, densities: Optional[dict] = None, *,
                    distributed: bool = False) -> tuple:
    """The gradient source of ``--estimator``: CGE (:class:`DistributedCGE` under torchrun), RGE
    with the unbiased scale (``E[g] ~ grad``, so one lr serves every estimator; q = ``--q`` or
    as many as CGE's queries), or None for backprop. Returns ``(estimator, d_active)``, d_active
    being the coordinates CGE estimates per step under ``densities`` (None for backprop)."""
    if cfg["estimator"] == "fo":
        return None, None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    d_active = sum(round(densities[n] * p.numel()) if densities and n in densities else p.numel()
                   for n, p in params.items())
    if cfg["estimator"] == "rge":
        return RGE(model, mu=cfg["mu"], q=cfg["q"] or d_active, scale="unbiased"), d_active
    kw = {"mu": cfg["mu"], "backend": cfg["backend"], "memory_budget": cfg["memory_budget"],
          "delta_precision": cfg.get("delta_precision", "fp32"), "base_precision": cfg.get("base_precision", "model")}
    if distributed:
        from .distributed import DistributedCGE
        return DistributedCGE(model, check_every=dist_setting(cfg, "check_every"), **kw), d_active
    return CGE(model, **kw), d_active


def _restore(rc: _Run, ck: dict, model, opt, sched, gens) -> TrainState:
    """The state of a resumed run, checked against this run's data."""
    path = rc.ckpt.path
    try:
        state = TrainState.from_checkpoint(ck, model, opt, sched, gens, rc.device)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} does not match the model/optimizer of its config "
                              f"({type(e).__name__}: {e})") from e
    if not (state.epoch >= 0 and 0 <= state.step <= rc.steps_per_epoch
            and (state.step == 0 or state.perm is not None)):
        raise CheckpointError(f"checkpoint {path} is corrupt (epoch {state.epoch}, step {state.step} "
                              f"of {rc.steps_per_epoch})")
    if state.perm is not None and state.perm.numel() != rc.ds.x_train.shape[0]:
        raise CheckpointError(f"checkpoint was made with {state.perm.numel()} training samples, "
                              f"the dataset now has {rc.ds.x_train.shape[0]}")
    mid = (f" (continuing step {state.step + 1}: {state.partial.perturbations} of {rc.d_active} perturbations done)"
           if state.partial is not None else "")
    rc.log(f"resumed {rc.ckpt.out_dir} at epoch {state.epoch + 1}, step {state.step}{mid}")
    return state


def backend_in_use(cfg: dict, device) -> str:
    """The fused-op backend the estimator runs on (what ``--backend`` resolves to here)."""
    if cfg["estimator"] != "cge":
        return "none"
    from .ops import resolve_backend
    try:
        return resolve_backend(cfg["backend"], device)
    except (ValueError, RuntimeError):
        return cfg["backend"]


def _extend(rc: _Run, state: TrainState, old_epochs: int, n_params: int, d_active) -> None:
    """``--resume DIR --epochs N`` past the saved length: the lr schedule is recomputed for N epochs
    from the current step on (a new schedule: a run started with N epochs would differ), and
    config.json records N."""
    lam = state.sched.lr_lambdas[0]
    lam.total_steps = rc.total_steps
    for g, base in zip(state.opt.param_groups, state.sched.base_lrs):
        g["lr"] = base * lam(state.sched.last_epoch)
    _write_run_files(rc, state, n_params, d_active)
    rc.log(f"extending the run from {old_epochs} to {rc.cfg['epochs']} epochs: the learning-rate schedule is "
           f"recomputed for {rc.cfg['epochs']} epochs from here")


def _write_run_files(rc: _Run, state: TrainState, n_params: int, d_active) -> None:
    """config.json (config and derived sizes) and densities.json of a fresh run."""
    ds = rc.ds
    rc.ckpt.write_text("config.json", json.dumps(
        {"config": rc.semantic, "derived": {"parameters": n_params, "steps_per_epoch": rc.steps_per_epoch,
                                            "active_coordinates": d_active, "device": str(rc.device),
                                            "backend": backend_in_use(rc.cfg, rc.device),
                                            "flags": {k: rc.cfg[k] for k in NUMERICS_FLAGS},
                                            "threads": torch.get_num_threads(),
                                            "dataset": {"train": ds.x_train.shape[0], "test": ds.x_test.shape[0],
                                                        "input_shape": list(ds.input_shape)}}},
        indent=2))
    dens = state.densities
    if dens is not None:
        params = dict(state.model.named_parameters())
        rc.ckpt.write_text("densities.json", json.dumps(
            {"sparsity": rc.cfg["sparsity"], "method": rc.cfg["sparsity_method"], "layers": dens,
             "overall": sum(dens[n] * params[n].numel() for n in dens) / sum(params[n].numel() for n in dens)},
            indent=2))


def _log_start(rc: _Run, state: TrainState, n_params: int, d_active) -> None:
    cfg, ds = rc.cfg, rc.ds
    rc.log(f"{cfg['dataset']}: {ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test, input "
           f"{tuple(ds.input_shape)}; model {cfg['model']} ({n_params} parameters); estimator "
           f"{cfg['estimator']}" + (f" ({d_active} queries/step)" if d_active else "") + f"; device {rc.device}")
    if state.densities is not None:
        rc.log("layer densities (" + cfg["sparsity_method"] + "): "
               + ", ".join(f"{k}={v:.3f}" for k, v in state.densities.items()))


def _diverged(rc: _Run, state: TrainState, what: str):
    raise TrainingDiverged(f"training diverged at epoch {state.epoch + 1}, step {state.step + 1}: {what}; "
                           f"stopped without saving ({rc.ckpt.kept()}). Lower --lr (now {rc.cfg['lr']:g})")


def _check_finite(rc: _Run, state: TrainState, tensors: dict, what: str) -> None:
    """Stop at the first nan/inf among ``tensors`` (one device sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors.values()]
    if flags and not bool(torch.stack(flags).all()):
        _diverged(rc, state, f"{what} {next(n for n, f in zip(tensors, flags) if not f)} is nan or inf")


def start_epoch(rc: _Run, state: TrainState) -> None:
    """Alg. 2 at an epoch's start: redraw the masks every K_sparse epochs (the same on every
    rank), then draw the epoch's data order."""
    if state.densities is not None and state.epoch % rc.cfg["mask_interval"] == 0:
        state.masks = {k: v.to(rc.device) for k, v in
                       random_masks(state.model, state.densities, generator=state.gens["mask"]).items()}
        if rc.dist_on:  # the same seeds give the same masks; rank 0's are sent to be safe
            from .distributed import broadcast_masks
            broadcast_masks(state.masks, src=0)
    state.perm = torch.randperm(rc.ds.x_train.shape[0], generator=state.gens["data"])
    state.ep = _new_epoch_stats()


def _next_batch(rc: _Run, state: TrainState) -> tuple:
    ds, s, bs = rc.ds, state.step, rc.cfg["batch_size"]
    idx = state.perm[s * bs:(s + 1) * bs]
    x = ds.prepare(ds.x_train[idx.to(ds.x_train.device)].to(rc.device), train=True, generator=state.gens["aug"])
    return x, ds.y_train[idx.to(ds.y_train.device)].to(rc.device)


def _gradient(rc: _Run, state: TrainState, x, y, on_chunk=None) -> tuple:
    """Fill the parameters' ``.grad``; returns ``(output, loss, perturbations, forwards)``."""
    model, est = state.model, rc.est
    if est is None:
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        rc.step_start_rng = None  # the optimizer step follows: no mid-step checkpoint from here
        return out.detach(), loss.item(), 0, 3  # fwd + bwd ~ 3 fwd
    before = est.num_perturbations
    if rc.cfg["estimator"] == "cge":
        kw = {} if rc.dist_on else {"partial": state.partial}  # ranks split the coordinates: no partial
        try:
            est.backward(x, y, masks=state.masks, on_chunk=on_chunk, **kw)
        except PartialMismatch as e:  # raised before any work: the step starts again, exactly
            rc.log(f"{e}; step {state.step + 1} starts again from its beginning")
            state.partial = PartialRun()
            if on_chunk is not None:
                on_chunk.n = 0
            est.backward(x, y, masks=state.masks, on_chunk=on_chunk, partial=state.partial)
    else:
        est.backward(x, y, generator=state.gens["est"], on_chunk=on_chunk)
    rc.step_start_rng = None  # from here on the step changes the model: no mid-step checkpoint
    if rc.cfg["estimator"] == "cge" and not rc.reported:  # once: which parts of the model run slowly, and why
        rc.reported = True
        rc.log(f"engine: {est.last_report}")
    perts = est.num_perturbations - before
    out, loss_val, fwd = est.last_output, est.last_loss, perts + 1
    if rc.bn_forward:
        with torch.no_grad():
            model(x)
        fwd += 1
    return out, loss_val, perts, fwd


def train_step(rc: _Run, state: TrainState, x, y, on_chunk=None) -> StepStats:
    """One optimizer step on ``(x, y)``: the gradient (masked for FO/RGE; CGE estimates only the
    masked coordinates), finiteness checks, the SGD step, the mu check, the lr schedule. Raises
    :class:`TrainingDiverged` before the step is recorded. ``on_chunk``: the estimator's progress
    callback (CGE: after each chunk of coordinates; RGE: after each chunk of directions)."""
    model = state.model
    state.opt.zero_grad(set_to_none=True)
    out, loss_val, perts, fwd = _gradient(rc, state, x, y, on_chunk)
    if state.masks is not None and rc.cfg["estimator"] != "cge":
        for n, p in model.named_parameters():  # sparse gradient for FO / RGE
            if n in state.masks and p.grad is not None:
                p.grad.mul_(state.masks[n])
    if not math.isfinite(loss_val):
        _diverged(rc, state, f"the training loss is {loss_val}")
    _check_finite(rc, state, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                  "the gradient of")
    state.opt.step()
    _check_finite(rc, state, {**dict(model.named_parameters()),
                              **{n: b for n, b in model.named_buffers() if b.is_floating_point()}},
                  "after the update,")
    if rc.est is not None:
        try:
            check_mu(rc.cfg["mu"], dict(model.named_parameters()))
        except ValueError as e:
            _diverged(rc, state, f"the weights grew too large for --mu {rc.cfg['mu']:g} to change them ({e})")
    state.sched.step()
    return StepStats(loss_val, int((out.argmax(1) == y).sum()), y.shape[0], perts, fwd,
                     list(rc.est.last_rank_seconds) if rc.dist_on else None)


def _record_step(state: TrainState, st: StepStats, seconds: float) -> None:
    ep = state.ep
    ep["loss"] += st.loss * st.n
    ep["correct"] += st.correct
    ep["n"] += st.n
    ep["perturbations"] += st.perturbations
    state.perturbations += st.perturbations
    state.forwards += st.forwards
    ep["seconds"] += seconds
    state.step += 1
    if st.rank_seconds is not None:
        prev = ep.get("rank_seconds")
        if not prev or len(prev) != len(st.rank_seconds):  # resumed on N' ranks
            prev = [0.0] * len(st.rank_seconds)
        ep["rank_seconds"] = [u + v for u, v in zip(prev, st.rank_seconds)]


def _run_epoch(rc: _Run, state: TrainState, bar: Progress) -> None:
    """The remaining steps of the current epoch (the current one from its finished chunks when
    resumed mid-step); a Ctrl-C stops after a chunk or at a step boundary."""
    ep = state.ep
    while state.step < rc.steps_per_epoch:
        rc.consistent = False
        t0 = time.perf_counter()
        if not rc.dist_on:  # single process: a Ctrl-C while estimating saves the step's chunks
            rc.step_start_rng = state.rng_state()
            if state.partial is None and rc.cfg["estimator"] == "cge":
                state.partial = PartialRun()
        x, y = _next_batch(rc, state)
        on_chunk = None
        if rc.est is not None and not rc.dist_on:
            total = rc.d_active if rc.cfg["estimator"] == "cge" else rc.est.q
            on_chunk = _StepProgress(rc, state, bar, total, state.partial.perturbations if state.partial else 0)
        st = train_step(rc, state, x, y, on_chunk=on_chunk)
        state.partial = None
        seconds = time.perf_counter() - t0
        _record_step(state, st, seconds)
        rc.consistent = True
        rc.scalars.add("step", {"train_loss": st.loss, "train_acc": st.correct / st.n,
                                "lr": state.opt.param_groups[0]["lr"],
                                "perturbations_per_s": st.perturbations / max(seconds, 1e-9)},
                       state.epoch * rc.steps_per_epoch + state.step)
        note = (f"loss {ep['loss'] / ep['n']:.3f}, acc {100 * ep['correct'] / ep['n']:.1f}%, "
                f"lr {state.opt.param_groups[0]['lr']:.4f}, {ep['perturbations'] / max(ep['seconds'], 1e-9):,.0f} "
                f"pert/s, run ETA {_run_eta(rc, state)}, rss {_gib(rss_bytes())}") if bar.due() else None
        bar.update(1, note=note)
        _on_step_end(state.epoch, state.step)
        rc.interrupts.check("step")


def _epoch_record(rc: _Run, state: TrainState, test_loss: float, test_acc: float) -> dict:
    ep, epoch = state.ep, state.epoch
    rec = {"epoch": epoch + 1, "train_loss": ep["loss"] / ep["n"], "train_acc": ep["correct"] / ep["n"],
           "test_loss": test_loss, "test_acc": test_acc, "lr": state.opt.param_groups[0]["lr"],
           "seconds": ep["seconds"], "perturbations": ep["perturbations"],
           "perturbations_per_s": ep["perturbations"] / max(ep["seconds"], 1e-9),
           "masks_redrawn": state.densities is not None and epoch % rc.cfg["mask_interval"] == 0}
    if rc.dist_on and ep.get("rank_seconds"):
        rs = ep["rank_seconds"]
        rec["ranks"] = len(rs)
        rec["rank_estimate_seconds"] = rs
        rec["imbalance"] = max(rs) / max(sum(rs) / len(rs), 1e-12)
    return rec


def end_epoch(rc: _Run, state: TrainState) -> dict:
    """Evaluate, record the epoch, move to the next one, write the checkpoint and metrics, log
    the epoch's line. Returns the epoch's record."""
    with _progress(rc, rc.ds.x_test.shape[0], f"evaluation {state.epoch + 1}", "samples") as bar:
        test_loss, test_acc = evaluate(state.model, rc.ds, rc.cfg["eval_batch_size"], rc.device, progress=bar,
                                       check=lambda: rc.interrupts.check("eval"))
    if not math.isfinite(test_loss):
        _diverged(rc, state, f"the test loss is {test_loss}")
    rc.consistent = False  # the record and the move to the next epoch happen together
    rec = _epoch_record(rc, state, test_loss, test_acc)
    state.history.append(rec)
    if test_acc > state.best_acc:
        state.best_acc, state.best_epoch = test_acc, state.epoch + 1
        rc.ckpt.save_best(state, rec)  # a stop before the checkpoint below redoes the epoch and this
    state.epoch += 1
    state.step = 0
    state.perm = None
    state.elapsed = time.perf_counter() - rc.t_start
    rc.ckpt.save(state, rc.semantic)
    rc.ckpt.write_text("metrics.jsonl", "".join(json.dumps(h) + "\n" for h in state.history))
    rc.ckpt.write_text("metrics.csv", metrics_csv(state.history))
    rc.consistent = True
    rc.scalars.add("epoch", rec, rec["epoch"])
    rc.log(f"epoch {rec['epoch']:3d}/{rc.cfg['epochs']}  train loss {rec['train_loss']:.4f} acc "
           f"{100 * rec['train_acc']:5.1f}%  test loss {test_loss:.4f} acc {100 * test_acc:5.1f}%  "
           f"lr {rec['lr']:.4f}  {rec['perturbations_per_s']:.0f} pert/s  {rec['seconds']:.1f}s"
           + (f"  run ETA {_run_eta(rc, state)}" if state.epoch < rc.cfg["epochs"] else "")
           + ("  [masks redrawn]" if rec["masks_redrawn"] else "")
           + (f"  {rec['ranks']} ranks, estimate s/rank "
              + "/".join(f"{v:.2f}" for v in rec["rank_estimate_seconds"])
              + f", imbalance {rec['imbalance']:.3f}" if "imbalance" in rec else ""))
    return rec


def _progress(rc: _Run, total: int, desc: str, unit: str, initial: int = 0) -> Progress:
    return Progress(total, desc, unit=unit, enabled=rc.progress, interval=rc.cfg.get("progress_interval", 30.0),
                    initial=initial)


def _train(rc: _Run, state: TrainState) -> bool:
    """Epochs until ``--epochs``. Returns True when interrupted by Ctrl-C, after saving what is
    consistent (:func:`_save_interrupted`)."""
    rc.t_start = time.perf_counter() - state.elapsed
    rc.elapsed_at_start, rc.steps_at_start = state.elapsed, state.epoch * rc.steps_per_epoch + state.step
    try:
        while state.epoch < rc.cfg["epochs"]:
            if state.perm is None:  # not started (a mid-step checkpoint at step 0 has its order)
                rc.consistent = False
                start_epoch(rc, state)
                rc.consistent = True
            with _progress(rc, rc.steps_per_epoch, f"epoch {state.epoch + 1}/{rc.cfg['epochs']}", "steps",
                           initial=state.step) as bar:
                _run_epoch(rc, state, bar)
            end_epoch(rc, state)
    except KeyboardInterrupt:
        state.elapsed = time.perf_counter() - rc.t_start
        rc.log(_save_interrupted(rc, state))
        return True
    return False


def _save_interrupted(rc: _Run, state: TrainState) -> str:
    """Save what an interrupt left consistent; returns the message that says what was saved."""
    where = f"epoch {state.epoch + 1}, step {state.step}"
    if rc.consistent:
        rc.ckpt.save(state, rc.semantic)
    elif rc.step_start_rng is not None:
        done = state.partial.perturbations if state.partial is not None else 0
        where = (f"epoch {state.epoch + 1}, step {state.step + 1}"
                 + (f" ({done} of {rc.d_active} perturbations done)" if state.partial is not None
                    else " (started again on resume)"))
        rc.ckpt.save(state, rc.semantic, step_start_rng=rc.step_start_rng)
    else:
        return f"interrupted at {where} while the step was applied; {rc.ckpt.kept()}"
    if rc.ckpt.enabled:
        return f"interrupted at {where}; checkpoint written, continue with --resume {rc.ckpt.out_dir}"
    return f"interrupted at {where}" + (" (no --out: nothing saved)" if rc.cfg.get("out") is None else "")


def metrics_csv(history: list) -> str:
    """The epoch records as CSV (one row per epoch; list values as JSON), for spreadsheets."""
    import csv
    import io
    cols = list(dict.fromkeys(k for h in history for k in h))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for h in history:
        w.writerow([json.dumps(h[c]) if isinstance(h.get(c), (list, dict)) else h.get(c, "") for c in cols])
    return buf.getvalue()


def _summary(rc: _Run, state: TrainState, interrupted: bool, n_params: int, d_active) -> dict:
    queries = state.grasp.get("queries", 0)
    return {"best_test_acc": max(state.best_acc, 0.0), "best_epoch": state.best_epoch,
            "final_test_acc": state.history[-1]["test_acc"] if state.history else None,
            "epochs_done": state.epoch, "wall_seconds": time.perf_counter() - rc.t_start,
            "perturbations": state.perturbations, "forward_equivalents": state.forwards + queries,
            "zo_grasp_queries": queries, "parameters": n_params, "active_coordinates": d_active,
            "interrupted": interrupted, "history": state.history}


def _report(rc: _Run, state: TrainState, summary: dict) -> None:
    """summary.json, metrics.png and the last line of the run."""
    rc.ckpt.write_text("summary.json", json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    if rc.ckpt.enabled and state.history:
        try:
            plot(state.history, os.path.join(rc.ckpt.out_dir, "metrics.png"),
                 title=f"{rc.cfg['model']} on {rc.cfg['dataset']}, {rc.cfg['estimator']}")
        except ImportError as e:  # matplotlib is optional at run time
            rc.log(f"no plot: {e}")
    rc.log(f"{'interrupted' if summary['interrupted'] else 'done'}: best test acc "
           f"{100 * summary['best_test_acc']:.2f}% (epoch {summary['best_epoch']}), wall time "
           f"{summary['wall_seconds']:.1f}s, forward-equivalents {summary['forward_equivalents']:,} "
           f"({summary['perturbations']:,} perturbed evaluations"
           + (f", {summary['zo_grasp_queries']} ZO-GraSP" if summary["zo_grasp_queries"] else "") + ")")


def run(cfg: dict, log=None) -> dict:
    """Train with the resolved config ``cfg`` (see :func:`parse_args`); returns a summary dict.
    Raises :class:`CheckpointError` for unusable checkpoints. A Ctrl-C is turned into
    ``summary['interrupted'] = True`` after saving what it left consistent (see :class:`_Interrupts`)."""
    dist_on, rank, own_group = _start_distributed(cfg)
    progress = cfg.get("progress", True) and rank == 0
    log = log or ((lambda m: _log(m, progress)) if rank == 0 else (lambda m: None))
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    dry = bool(cfg.get("dry_run"))
    ckpt = Checkpointer(cfg.get("out"), enabled=rank == 0 and not dry)  # a dry run writes nothing
    semantic = {k: v for k, v in cfg.items() if k not in RESUME_FREE}
    ck = ckpt.load(semantic) if cfg.get("resume") is not None else ckpt.claim()  # before any write
    with _Interrupts() as interrupts:
        try:
            rc, state, sizes = _prepare(cfg, ck, ckpt, semantic, log, progress, dist_on, interrupts)
        except KeyboardInterrupt:  # during the calibration or ZO-GraSP
            log(f"interrupted before training started; {ckpt.kept()}")
            return {"interrupted": True, "dry_run": dry}
        if rc is None:
            return {"interrupted": False, "dry_run": True}
        rc.scalars = Scalars(cfg.get("out"), ckpt.enabled, log)
        try:
            interrupted = _train(rc, state)
        finally:
            rc.scalars.close()
    summary = _summary(rc, state, interrupted, *sizes)
    if dist_on:
        import torch.distributed as tdist
        summary["ranks"] = tdist.get_world_size()
        if own_group:
            tdist.destroy_process_group()
    _report(rc, state, summary)
    return summary


def _prepare(cfg, ck, ckpt, semantic, log, progress, dist_on, interrupts) -> tuple:
    """Data, model, optimizer, the cost projection, ZO-GraSP (fresh runs; its result is
    checkpointed at once) or the restored state. Returns ``(rc, state, (n_params, d_active))``, or
    ``(None, None, None)`` for a dry run."""
    dry = bool(cfg.get("dry_run"))
    device = resolve_device(cfg["device"])
    ds = D.load_dataset(cfg["dataset"], cfg["data_dir"], augment=cfg["augment"], seed=cfg["seed"],
                        synthetic_shape=cfg["synthetic_shape"], synthetic_n=cfg["synthetic_size"]).to(device)
    check_sizes(cfg, ds, device)
    model = make_model(cfg, ds).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gens = generators(cfg["seed"])
    steps_per_epoch = math.ceil(ds.x_train.shape[0] / cfg["batch_size"])
    opt, sched = build_optimizer(cfg, model, steps_per_epoch)
    log(setup_summary(cfg, device))
    _check_mu_flag(cfg, model)
    if ck is None:  # a fresh run: its cost before any work (ZO-GraSP included), densities provisional
        provisional = ({n: 1.0 - cfg["sparsity"] for n in prunable_weights(model)}
                       if cfg["sparsity_method"] != "none" else None)
        _check_cost(log, cfg, model, ds, device, provisional, steps=steps_per_epoch * cfg["epochs"],
                    epochs=cfg["epochs"], grasp=cfg["sparsity_method"] == "zo_grasp", dist_on=dist_on,
                    check=lambda: interrupts.check("calibration"))
        if dry:
            return None, None, None
        densities, grasp = _densities(cfg, model, ds, gens, device, log, progress, interrupts)
    else:
        densities, grasp = ck["densities"], ck["grasp"]
    est, d_active = build_estimator(cfg, model, densities, distributed=dist_on)
    rc = _Run(cfg, semantic, device, ds, est, ckpt, log, progress, dist_on, steps_per_epoch,
              steps_per_epoch * cfg["epochs"], est is not None and has_running_stats(model), d_active, interrupts)
    if ck is None:
        state = TrainState(model, opt, sched, gens, densities=densities, grasp=grasp)
        _write_run_files(rc, state, n_params, d_active)
        rc.ckpt.save(state, semantic)  # ZO-GraSP's result is never computed twice
        _log_start(rc, state, n_params, d_active)
        return rc, state, (n_params, d_active)
    state = _restore(rc, ck, model, opt, sched, gens)
    old_epochs = ck["config"]["epochs"]
    if cfg["epochs"] > old_epochs and not dry:
        _extend(rc, state, old_epochs, n_params, d_active)
    left = rc.total_steps - (state.epoch * steps_per_epoch + state.step)
    if left > 0 or dry:  # what is left of the run
        _check_cost(log, cfg, model, ds, device, densities, steps=left, epochs=cfg["epochs"] - state.epoch,
                    grasp=False, dist_on=dist_on, check=lambda: interrupts.check("calibration"))
    return (None, None, None) if dry else (rc, state, (n_params, d_active))


def plot(history: list, path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a1.plot(ep, [h["test_loss"] for h in history], label="test")
    a1.set_xlabel("epoch"); a1.set_ylabel("loss"); a1.legend()
    a2.plot(ep, [100 * h["train_acc"] for h in history], label="train")
    a2.plot(ep, [100 * h["test_acc"] for h in history], label="test")
    a2.set_xlabel("epoch"); a2.set_ylabel("accuracy (%)"); a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("can't allocate memory", "out of memory",
                                                                    "not enough memory")))


def main(argv=None) -> int:
    cfg, parser = parse_args(argv)
    try:
        summary = run(cfg)
    except UsageError as e:
        parser.error(str(e))
    except (CheckpointError, TrainingDiverged, OSError, D.DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); lower "
              f"--batch-size, --width, --q or --grasp-q, or set --memory-budget", file=sys.stderr)
        return 1
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
