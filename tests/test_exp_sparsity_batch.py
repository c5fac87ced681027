"""The Fig. A3 (sparsity methods) and Fig. A5 (batch size) experiments (issue 17):
python/experiments/fig_a3_sparsity.py and fig_a5_batch_size.py.

The mask logic of each Fig. A3 method is checked against its definition (paper Sec. 4 and App. E):
M2's mask is ZO-GraSP's at initialisation and never changes; M1's is recomputed exactly at its
period, from ZO-GraSP scores of the current weights; LPR-guided masks obey ZO-GraSP's layer
densities and are redrawn every K epochs; every method's gradient is zero outside its mask.
The script's training loop is the trainer's step for step, so at sparsity 0 all methods give
bitwise the same run and the loop with the trainer's own masks reproduces the trainer's run."""
import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepzero_kernels import data as D
from deepzero_kernels import train
from deepzero_kernels.pruning import layer_densities, prunable_weights, prune_masks, zo_grasp_scores

from conftest import load_script

pytestmark = pytest.mark.experiment

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    return load_script(f"python/experiments/{name}.py")


A3 = _load("fig_a3_sparsity")
A5 = _load("fig_a5_batch_size")
TINY = ["--width", "4", "--depth", "1", "--grasp-q", "6", "--threads", "1", "--device", "cpu"]


def a3_args(*extra):
    args, _, _ = A3.parse_args(TINY + list(extra))
    return args


def setup(method, sparsity=0.8, *extra):
    """A MaskSchedule on the tiny model, plus the pieces to recompute its masks independently."""
    cfg = A3.make_cfg(a3_args("--batch-size", "256", *extra), method, sparsity, 0)
    ds = D.load_dataset("digits")
    model = train.make_model(cfg, ds).train()
    gens = train.generators(0)
    spe = math.ceil(ds.x_train.shape[0] / cfg["batch_size"])
    return cfg, ds, model, gens, spe


def shake(model, seed):
    """Move the weights as training would (so ZO-GraSP on the current weights differs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))


def independent_grasp_masks(cfg, ds, model, grasp_state, sparsity):
    """ZO-GraSP + global pruning from the library, with the grasp generator in ``grasp_state``:
    a fresh random training batch of --batch-size, then q directions, as the trainer draws them."""
    g = torch.Generator()
    g.set_state(grasp_state)
    idx = torch.randperm(ds.x_train.shape[0], generator=g)[:cfg["batch_size"]]
    scores = zo_grasp_scores(model, ds.prepare(ds.x_train[idx], train=False), ds.y_train[idx],
                             q=cfg["grasp_q"], mu=cfg["mu"], generator=g)
    return prune_masks(scores, sparsity)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- M2
def test_m2_mask_is_zo_grasp_at_init_and_never_changes():
    cfg, ds, model, gens, spe = setup("m2")
    state0 = gens["grasp"].get_state()
    expect = independent_grasp_masks(cfg, ds, copy.deepcopy(model), state0, 0.8)
    ms = A3.MaskSchedule("m2", cfg, model, ds, gens, torch.device("cpu"), spe)
    assert same(ms.masks, expect)
    for epoch in range(3):
        for step in range(spe):
            shake(model, 100 * epoch + step)
            assert same(ms.masks_at(epoch, step), expect)
    assert ms.grasp_calls == 1 and ms.updates == [0]


# ----------------------------------------------------------------------------- M1
@pytest.mark.parametrize("period", [0, 2])
def test_m1_mask_recomputed_at_its_period_from_current_weights(period):
    cfg, ds, model, gens, spe = setup("m1")
    assert spe == 6
    expect = independent_grasp_masks(cfg, ds, copy.deepcopy(model), gens["grasp"].get_state(), 0.8)
    ms = A3.MaskSchedule("m1", cfg, model, ds, gens, torch.device("cpu"), spe, m1_period=period)
    assert same(ms.masks, expect)  # the first mask: ZO-GraSP at initialisation (= M2's)
    every = period or spe
    recomputed, changed = [], 0
    for epoch in range(2):
        for step in range(spe):
            t = epoch * spe + step
            shake(model, t)
            state, before = gens["grasp"].get_state(), ms.masks
            masks = ms.masks_at(epoch, step)
            if t > 0 and t % every == 0:
                recomputed.append(t)
                fresh = independent_grasp_masks(cfg, ds, copy.deepcopy(model), state, 0.8)
                assert same(masks, fresh), f"step {t}: not ZO-GraSP of the current weights"
                changed += not same(masks, before)
            else:
                assert masks is before and torch.equal(gens["grasp"].get_state(), state)
    assert recomputed == [t for t in range(1, 2 * spe) if t % every == 0] and recomputed
    assert changed >= 1  # the weights moved, so did the mask
    assert ms.grasp_calls == 1 + len(recomputed) and ms.updates == [0] + recomputed
    assert len(ms.turnover) == len(recomputed) and max(ms.turnover) > 0


def test_m1_query_cost_grows_with_recomputations():
    """The paper's point against M1: its ZO-GraSP queries grow with the recomputations, the
    others pay one ZO-GraSP call (random: none)."""
    args = a3_args("--epochs", "2", "--batch-size", "512")
    q1 = 2 * args.grasp_q + 2
    cost = {}
    for m, period in (("m1", 0), ("m1", 1), ("m2", 0), ("lpr", 0), ("random", 0)):
        cfg = A3.make_cfg(args, m, 0.8, 0)
        cost[m, period] = A3.train_loop(cfg, m, m1_period=period)["zo_grasp_queries"]
    assert cost["m1", 0] == 2 * q1             # at init + at epoch 2's start
    assert cost["m1", 1] == 6 * q1             # every one of the 2 x 3 steps
    assert cost["m2", 0] == cost["lpr", 0] == q1 and cost["random", 0] == 0


# ----------------------------------------------------------------------------- LPR-guided and random
def test_lpr_masks_obey_zo_grasp_layer_densities_and_redraw_every_k_epochs():
    cfg, ds, model, gens, spe = setup("lpr", 0.8, "--mask-interval", "2")
    dens = layer_densities(independent_grasp_masks(cfg, ds, copy.deepcopy(model), gens["grasp"].get_state(), 0.8))
    trainer_dens, _ = train.choose_densities(cfg, copy.deepcopy(model), ds, train.generators(0), torch.device("cpu"))
    assert dens == trainer_dens  # the trainer's LPRs for this seed
    assert len(set(dens.values())) > 1  # ZO-GraSP's ratios are not uniform
    ms = A3.MaskSchedule("lpr", cfg, model, ds, gens, torch.device("cpu"), spe)
    assert ms.densities == dens and ms.grasp_calls == 1
    params = dict(model.named_parameters())
    seen = []
    for epoch in range(5):
        for step in range(spe):
            before = ms.masks
            masks = ms.masks_at(epoch, step)
            for n, d in dens.items():
                assert int(masks[n].sum()) == round(d * params[n].numel())
            if step == 0 and epoch % 2 == 0:
                seen.append(masks)
                assert before is None or not same(masks, before)  # a fresh random draw
            else:
                assert masks is before
    assert len(seen) == 3 and ms.grasp_calls == 1


def test_random_masks_have_the_same_density_in_every_layer():
    cfg, ds, model, gens, spe = setup("random", 0.75)
    ms = A3.MaskSchedule("random", cfg, model, ds, gens, torch.device("cpu"), spe)
    masks = ms.masks_at(0, 0)
    params = dict(model.named_parameters())
    assert set(masks) == set(prunable_weights(model)) and ms.grasp_calls == 0
    for n, m in masks.items():
        assert int(m.sum()) == round(0.25 * params[n].numel())


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("regime", ["fo", "zo"])
@pytest.mark.parametrize("method", ["lpr", "m1", "m2", "random"])
def test_gradient_is_zero_outside_the_mask(method, regime):
    cfg = A3.make_cfg(a3_args("--epochs", "1", "--batch-size", "512", "--regime", regime), method, 0.8, 0)
    checked = []

    def on_step(model, masks):
        params = dict(model.named_parameters())
        assert set(masks) == set(prunable_weights(model))
        for n, m in masks.items():
            g = params[n].grad
            assert torch.count_nonzero(g[~m]) == 0, f"{method}/{regime}: gradient outside the mask of {n}"
            assert torch.count_nonzero(g[m]) > 0
        checked.append(sum(int(m.sum()) for m in masks.values()))
    s = A3.train_loop(cfg, method, on_step=on_step)
    n_prunable = sum(dict(s["model"].named_parameters())[n].numel() for n in prunable_weights(s["model"]))
    assert len(checked) == 3 and all(c == round(0.2 * n_prunable) or method in ("lpr", "random") for c in checked)
    if regime == "zo":  # Sparse-CGE: the masked coordinates plus the dense BatchNorm/bias ones
        dense = sum(p.numel() for n, p in s["model"].named_parameters() if n not in prunable_weights(s["model"]))
        assert s["perturbations"] == sum(c + dense for c in checked)


# ----------------------------------------------------------------------------- the same recipe
def _hist(s):
    return [(h["train_loss"], h["train_acc"], h["test_loss"], h["test_acc"]) for h in s["history"]]


def test_sparsity_zero_gives_identical_runs_for_every_method():
    """Same init, data order, recipe: with no pruning the masks are all-ones and the ZO-GraSP
    calls leave the run alone, so all methods (trainer and loop) give bitwise the same run."""
    args = a3_args("--epochs", "2")
    runs = {"dense (trainer)": train.run(A3.make_cfg(args, "dense", 0.0, 0), log=lambda m: None)}
    for m in ("lpr", "random"):
        runs[f"{m} (trainer)"] = train.run(A3.make_cfg(args, m, 0.0, 0), log=lambda m: None)
    for m in A3.METHODS:
        runs[f"{m} (loop)"] = A3.train_loop(A3.make_cfg(args, m, 0.0, 0), m, m1_period=1)
    ref = _hist(runs["dense (trainer)"])
    for name, s in runs.items():
        assert _hist(s) == ref, name
    assert runs["m1 (loop)"]["zo_grasp_calls"] == 2 * 12  # it did recompute, every step


@pytest.mark.parametrize("method", ["lpr", "random"])
def test_loop_reproduces_the_trainer_with_its_masks(method):
    """At sparsity 0.8 the loop with the trainer's mask policy is the trainer's run, bitwise:
    the loop differs from the trainer only where a method's masks differ."""
    cfg = A3.make_cfg(a3_args("--epochs", "3", "--mask-interval", "2"), method, 0.8, 0)
    a = train.run(cfg, log=lambda m: None)
    b = A3.train_loop(cfg, method)
    assert _hist(a) == _hist(b)
    other = A3.train_loop(A3.make_cfg(a3_args("--epochs", "3"), "m2", 0.8, 0), "m2")
    assert _hist(other) != _hist(a)  # different masks, different run


def test_a3_flags():
    args, methods, sp = A3.parse_args(["--quick"])
    assert sp == [0.7, 0.95] and args.epochs == 5 and args.repeats == 1 and methods == list(A3.METHODS)
    for bad in (["--methods", "m3"], ["--sparsities", "1.0"], ["--m1-period", "-1"]):
        with pytest.raises(SystemExit):
            A3.parse_args(bad)


# ----------------------------------------------------------------------------- Fig. A5
def test_a5_lr_scaling_and_config():
    args, sizes = A5.parse_args(["--lr-scaling", "linear", "--lr", "0.1", "--batch-sizes", "512,16,64"])
    assert sizes == [16, 64, 512]
    assert A5.scaled_lr(args, 128) == pytest.approx(0.1) and A5.scaled_lr(args, 512) == pytest.approx(0.4)
    cfg = A5.make_cfg(args, 512, 3)
    assert (cfg["batch_size"], cfg["estimator"], cfg["sparsity"], cfg["sparsity_method"], cfg["seed"]) == \
        (512, "cge", 0.9, "zo_grasp", 3)
    assert cfg["lr"] == pytest.approx(0.4)
    args, _ = A5.parse_args([])
    assert A5.scaled_lr(args, 16) == A5.scaled_lr(args, 512) == 0.1
    with pytest.raises(SystemExit):
        A5.parse_args(["--batch-sizes", "0,16"])


def test_a5_run_one_counts_steps_and_time():
    args, _ = A5.parse_args(["--epochs", "1", "--width", "4", "--depth", "1", "--grasp-q", "4", "--threads", "1",
                             "--device", "cpu"])
    row, hist = A5.run_one(args, 512, 0, 1437)
    assert row["steps_per_epoch"] == 3 and row["total_steps"] == 3 and len(hist) == 1
    assert row["epoch_seconds_median"] > 0 and row["perturbations_per_s"] > 0
    assert hist[0]["perturbations"] == 3 * row["active_coordinates"]


# ----------------------------------------------------------------------------- the --quick runs
def _run(script, out):
    r = subprocess.run([sys.executable, str(ROOT / "python" / "experiments" / script), "--quick", "--threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.paper_experiment
def test_fig_a3_quick(tmp_path):
    _run("fig_a3_sparsity.py", tmp_path)
    for ext in ("csv", "json", "md", "png"):
        assert (tmp_path / f"fig_a3.{ext}").stat().st_size > 100
    rows = list(csv.DictReader(open(tmp_path / "fig_a3.csv")))
    by = {(r["method"], float(r["sparsity"])): r for r in rows}
    assert set(by) == {("dense", 0.0)} | {(m, s) for m in A3.METHODS for s in (0.7, 0.95)}
    acc = {k: float(r["final_test_acc"]) for k, r in by.items()}
    assert acc["dense", 0.0] > 0.85
    for m in A3.METHODS:
        assert 0.1 < acc[m, 0.95] <= acc["dense", 0.0] and acc[m, 0.7] > 0.5
    q = {m: int(by[m, 0.7]["zo_grasp_queries"]) for m in A3.METHODS}
    assert q["m1"] == 5 * q["m2"] and q["m2"] == q["lpr"] == 2 * 192 + 2 and q["random"] == 0
    info = json.load(open(tmp_path / "fig_a3.json"))
    assert info["machine"]["torch"] == torch.__version__ and info["settings"]["quick"]
    dens = info["layer_densities"]["0.95"]
    assert len(set(dens.values())) > 1 and min(dens.values()) < 0.05 < max(dens.values())
    assert "M1" in (tmp_path / "fig_a3.md").read_text()


@pytest.mark.paper_experiment
def test_fig_a5_quick(tmp_path):
    _run("fig_a5_batch_size.py", tmp_path)
    for ext in ("csv", "json", "md", "png"):
        assert (tmp_path / f"fig_a5.{ext}").stat().st_size > 100
    rows = {int(r["batch_size"]): r for r in csv.DictReader(open(tmp_path / "fig_a5.csv"))}
    assert sorted(rows) == [32, 128, 512]
    assert [int(rows[b]["steps_per_epoch"]) for b in (32, 128, 512)] == [45, 12, 3]
    assert all(float(r["epoch_seconds_median"]) > 0 and float(r["lr"]) == 0.1 for r in rows.values())
    # a fixed epoch budget: the smallest batch takes 15x the steps and learns the most
    assert float(rows[32]["final_test_acc"]) > float(rows[512]["final_test_acc"]) + 0.2
    info = json.load(open(tmp_path / "fig_a5.json"))
    assert len(info["histories"]) == 3 and all(len(h) == 3 for h in info["histories"].values())
