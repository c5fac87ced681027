"""Interruption without loss: Ctrl-C at random points of a run (ZO-GraSP, inside a step's chunks,
evaluation, twice in a row) and ``--resume`` continue bit for bit; the engine's partial estimates
continue bitwise; the progress facility's output on terminals, logs and ``--no-progress``."""
import io
import os
import random
import signal

import pytest
import torch

from deepzero_kernels import CGE, train
from deepzero_kernels.engine import PartialRun
from deepzero_kernels.models import build_model
from deepzero_kernels.progress import Progress

TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-size", "48,24",
        "--model", "cnn", "--width", "4", "--depth", "2", "--batch-size", "16", "--grasp-q", "4",
        "--no-progress", "--threads", "1", "--epochs", "2", "--mask-interval", "1"]
CGE_RUN = TINY + ["--estimator", "cge", "--sparsity", "0.5", "--sparsity-method", "zo_grasp"]
RGE_RUN = TINY + ["--estimator", "rge", "--q", "40", "--sparsity", "0.5", "--sparsity-method", "random"]


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------- engine
def _estimate_interrupted(cge, x, y, masks, stop_after):
    """An estimate stopped by an exception after ``stop_after`` chunks, continued from its
    checkpointed record."""
    partial, seen = PartialRun(), [0]

    def on_chunk(name, k):
        seen[0] += 1
        if seen[0] == stop_after:
            raise _Stop
    with pytest.raises(_Stop):
        cge.estimate(x, y, masks, on_chunk=on_chunk, partial=partial)
    saved = partial.state_dict()
    assert 0 < PartialRun.from_state_dict(saved).perturbations < sum(int(m.sum()) for m in masks.values())
    return cge.estimate(x, y, masks, partial=PartialRun.from_state_dict(saved))


@pytest.mark.parametrize("strategy,backend", [("delta", "torch"), ("delta", "native"), ("functional", "torch")])
def test_partial_estimate_continues_bitwise(strategy, backend):
    from deepzero_kernels.ops import backends
    if backend not in backends():
        pytest.skip(f"backend {backend} not built")
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, width=4, depth=2).double()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < 0.6 for n, p in model.named_parameters()}
    cge = CGE(model, backend=backend, strategy=strategy, memory_budget=1 << 18)
    chunks = [0]
    full = cge.estimate(x, y, masks, on_chunk=lambda n, k: chunks.__setitem__(0, chunks[0] + 1))
    assert chunks[0] > 4
    for stop_after in sorted(random.Random(2).sample(range(1, chunks[0]), 4)):
        resumed = _estimate_interrupted(cge, x, y, masks, stop_after)
        for n in full:
            assert torch.equal(full[n], resumed[n]), (stop_after, n)


def test_partial_estimate_refuses_another_batch_and_bad_records():
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, num_classes=10, width=4, depth=2)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    cge, partial = CGE(model), PartialRun()

    def stop(name, k):
        raise _Stop
    with pytest.raises(_Stop):
        cge.estimate(x, y, on_chunk=stop, partial=partial)
    with pytest.raises(ValueError, match="cannot be continued exactly.*unperturbed losses differ"):
        cge.estimate(x + 1, y, partial=PartialRun.from_state_dict(partial.state_dict()))
    sd = partial.state_dict()
    for bad in ({}, {**sd, "done": {"fc.weight": -1}}, {**sd, "rows": {"fc.weight": torch.zeros(3)}},
                {**sd, "chunk": {"fc.weight": 0}}, "not a dict"):
        with pytest.raises(ValueError, match="partial estimate"):
            PartialRun.from_state_dict(bad)


# ----------------------------------------------------------------------------- trainer
def _augmenting(mp):
    """Synthetic data with crop + flip augmentation, so each batch draws from a generator (the
    state a mid-step checkpoint must take from before the batch)."""
    load = train.D.load_dataset

    def load_augmented(*args, **kwargs):
        ds = load(*args, **kwargs)
        ds.augment = True
        return ds
    mp.setattr(train.D, "load_dataset", load_augmented)


@pytest.fixture(autouse=True)
def augmented(monkeypatch):
    _augmenting(monkeypatch)


def _ctrl_c_at(monkeypatch, where, n, presses=1):
    """Press Ctrl-C ``presses`` times at the n-th (1-based) tick of kind ``where``."""
    seen = [0]

    def tick(kind):
        if kind == where:
            seen[0] += 1
            if seen[0] == n:
                for _ in range(presses):
                    signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(train, "_on_tick", tick)
    return seen


def _count_ticks(monkeypatch, argv, out):
    counts = {}
    monkeypatch.setattr(train, "_on_tick", lambda kind: counts.__setitem__(kind, counts.get(kind, 0) + 1))
    assert train.main(argv + ["--out", out]) == 0
    monkeypatch.setattr(train, "_on_tick", lambda kind: None)
    return counts


def _same_run(a, b):
    ka = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=True)
    kb = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)
    for k in ka["model"]:
        assert torch.equal(ka["model"][k], kb["model"][k]), k  # BN running statistics included
    strip = ("seconds", "perturbations_per_s")
    ha = [{k: v for k, v in h.items() if k not in strip} for h in ka["state"]["history"]]
    hb = [{k: v for k, v in h.items() if k not in strip} for h in kb["state"]["history"]]
    assert ha == hb
    assert ka["state"]["perturbations"] == kb["state"]["perturbations"]


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """The uninterrupted references, and how many ticks of each kind they pass."""
    mp = pytest.MonkeyPatch()
    _augmenting(mp)
    try:
        out = {}
        for name, argv in (("cge", CGE_RUN), ("rge", RGE_RUN)):
            d = str(tmp_path_factory.mktemp(name) / "full")
            out[name] = (d, _count_ticks(mp, argv, d))
        return out
    finally:
        mp.undo()


@pytest.mark.parametrize("where,presses", [("chunk", 1), ("chunk", 2), ("eval", 1), ("eval", 2), ("step", 1)])
@pytest.mark.parametrize("draw", [0, 1])
def test_ctrl_c_anywhere_then_resume_is_bitwise(tmp_path, monkeypatch, capsys, full_runs, where, presses, draw):
    full, counts = full_runs["cge"]
    n = random.Random(f"{where}{presses}{draw}").randint(1, counts[where])
    part = str(tmp_path / "part")
    seen = _ctrl_c_at(monkeypatch, where, n, presses)
    assert train.main(CGE_RUN + ["--out", part]) == 130
    assert seen[0] == n  # stopped at (or, pressed twice, inside) the tick where Ctrl-C came
    msg = capsys.readouterr().out
    assert "checkpoint written, continue with --resume" in msg, msg
    ck = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    if where == "chunk" and presses == 1:  # stopped inside a step with its finished chunks
        assert ck["partial"] is not None and sum(ck["partial"]["done"].values()) > 0
    monkeypatch.setattr(train, "_on_tick", lambda kind: None)
    assert train.main(["--resume", part, "--no-progress"]) == 0
    _same_run(full, part)


def test_ctrl_c_during_zo_grasp_saves_nothing_and_says_so(tmp_path, monkeypatch, capsys, full_runs):
    full, counts = full_runs["cge"]
    part = str(tmp_path / "part")
    _ctrl_c_at(monkeypatch, "grasp", counts["grasp"])
    assert train.main(CGE_RUN + ["--out", part]) == 130
    msg = capsys.readouterr().out
    assert "interrupted before training started; no checkpoint was written" in msg, msg
    assert not os.path.exists(os.path.join(part, "checkpoint.pt"))
    monkeypatch.setattr(train, "_on_tick", lambda kind: None)
    assert train.main(CGE_RUN + ["--out", part]) == 0  # the same command starts it again
    _same_run(full, part)


def test_zo_grasp_result_is_checkpointed_before_the_first_step(tmp_path, monkeypatch):
    part = str(tmp_path / "part")
    _ctrl_c_at(monkeypatch, "chunk", 1, presses=2)
    assert train.main(CGE_RUN + ["--out", part]) == 130
    ck = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    assert ck["grasp"]["queries"] == 10 and ck["densities"] and ck["state"]["step"] == 0


def test_rge_ctrl_c_mid_step_restarts_the_step_bitwise(tmp_path, monkeypatch, capsys, full_runs):
    full, counts = full_runs["rge"]
    part = str(tmp_path / "part")
    _ctrl_c_at(monkeypatch, "chunk", counts["chunk"] // 2 + 1)
    assert train.main(RGE_RUN + ["--out", part]) == 130
    assert "started again on resume" in capsys.readouterr().out
    monkeypatch.setattr(train, "_on_tick", lambda kind: None)
    assert train.main(["--resume", part, "--no-progress"]) == 0
    _same_run(full, part)


def test_ctrl_c_while_the_step_is_applied_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A second Ctrl-C after the estimate (the optimizer step) must not save a half-updated state."""
    part = str(tmp_path / "part")
    real = train._check_finite

    def press_during_update(rc, state, tensors, what):
        if what.startswith("after the update") and state.epoch == 1 and state.step == 1:
            raise KeyboardInterrupt
        return real(rc, state, tensors, what)
    monkeypatch.setattr(train, "_check_finite", press_during_update)
    assert train.main(CGE_RUN + ["--out", part]) == 130
    msg = capsys.readouterr().out
    assert "while the step was applied; the last good checkpoint" in msg, msg
    ck = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    assert (ck["state"]["epoch"], ck["state"]["step"]) == (1, 0)  # the end of epoch 1


# ----------------------------------------------------------------------------- progress
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_on_a_log_and_nothing_when_disabled():
    log = io.StringIO()
    with Progress(10, "work", unit="items", interval=0, stream=log) as p:
        p.update(4)
        p.note("half way")
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("work: 4/10 items (40%)") and "ETA" in lines[0]
    assert lines[-1].endswith("; half way") and "\r" not in log.getvalue()
    quiet = io.StringIO()
    with Progress(10, "work", interval=3600, stream=quiet) as p:  # before its interval: no line
        p.update(10)
    off = io.StringIO()
    with Progress(10, "work", enabled=False, interval=0, stream=off) as p:
        p.update(3)
        assert not p.due()
    assert quiet.getvalue() == "" and off.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar():
    tty = _Tty()
    with Progress(5, "work", stream=tty) as p:
        assert p.bar is not None
        p.update(5)
    assert "work" in tty.getvalue()


def test_trainer_progress_in_a_log_file(tmp_path, capfd):
    argv = [a for a in CGE_RUN if a != "--no-progress"] + ["--progress-interval", "0", "--epochs", "1"]
    assert train.main(argv) == 0
    err = capfd.readouterr().err
    for what in ("ZO-GraSP: ", "epoch 1/1: ", "perturbations, ", "evaluation 1: ", "run ETA"):
        assert what in err, what
    assert "\r" not in err


# ----------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch, capsys):
    """With a stand-in SummaryWriter (tensorboard need not be installed): every step's and every
    epoch's numbers, steps counted over the run; without the package a log line says how to get them."""
    import sys
    import types
    written = []

    class Writer:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append(("closed",))
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    out = tmp_path / "run"
    assert train.main(CGE_RUN + ["--out", str(out)]) == 0
    assert written[0] == ("dir", str(out / "tensorboard")) and written[-1] == ("closed",)
    steps = [s for t, *rest in written[1:-1] if t == "step/train_loss" for _, s in [rest]]
    assert steps == [1, 2, 3, 4, 5, 6]  # 3 steps per epoch, 2 epochs
    epochs = {(t, s) for t, *rest in written[1:-1] if t.startswith("epoch/") for _, s in [rest]}
    assert ("epoch/test_acc", 1) in epochs and ("epoch/test_acc", 2) in epochs
    assert "tensorboard --logdir" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    assert train.main(CGE_RUN + ["--out", str(tmp_path / "run2")]) == 0
    assert "TensorBoard logs: off (pip install tensorboard" in capsys.readouterr().out


def test_tensorboard_real_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert train.main(CGE_RUN + ["--out", str(out)]) == 0
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0


# ----------------------------------------------------------------------------- records that do not fit
def _interrupted_mid_step(monkeypatch, out, argv, n=5):
    _ctrl_c_at(monkeypatch, "chunk", n)
    assert train.main(argv + ["--out", out]) == 130
    monkeypatch.setattr(train, "_on_tick", lambda kind: None)
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ck["partial"] is not None
    return ck


def test_resume_reuses_the_runs_backend_and_budget(tmp_path, monkeypatch):
    """--backend/--memory-budget are not part of the run's identity, but they decide rounding: a
    --resume that does not give them takes the run's own (bitwise), one that gives others restarts
    the interrupted step instead of mixing chunks of two setups."""
    argv = CGE_RUN + ["--backend", "torch", "--memory-budget", "200000"]
    full, part, other = (str(tmp_path / d) for d in ("full", "part", "other"))
    assert train.main(argv + ["--out", full]) == 0
    _interrupted_mid_step(monkeypatch, part, argv)
    assert train.main(["--resume", part, "--no-progress"]) == 0  # backend torch, budget 200000 from the run
    _same_run(full, part)
    _interrupted_mid_step(monkeypatch, other, argv)
    logs = []
    cfg, _ = train.parse_args(["--resume", other, "--no-progress", "--memory-budget", "100000"])
    assert train.run(cfg, log=logs.append)["interrupted"] is False
    assert any("cannot be continued exactly" in m and "starts again from its beginning" in m for m in logs), logs


@pytest.mark.parametrize("edit", ["extra_name", "too_many_done", "two_partly_done"])
def test_a_record_that_does_not_fit_restarts_the_step(tmp_path, monkeypatch, edit):
    out = str(tmp_path / "part")
    ck = _interrupted_mid_step(monkeypatch, out, CGE_RUN, n=4)
    p = ck["partial"]
    name = next(iter(p["done"]))
    if edit == "extra_name":
        p["done"]["nope.weight"], p["chunk"]["nope.weight"] = 1, 1
        p["rows"]["nope.weight"] = p["rows"][name][:1].clone()
    elif edit == "too_many_done":
        p["done"][name] = 10 ** 6
        p["rows"][name] = torch.zeros(10 ** 6, p["rows"][name].shape[1], dtype=torch.float64)
    else:
        for other in ("features.0.weight", "features.4.weight"):
            p["done"][other], p["chunk"][other] = 1, 1
            p["rows"][other] = p["rows"][name][:1].clone()
    torch.save(ck, os.path.join(out, "checkpoint.pt"))
    logs = []
    cfg, _ = train.parse_args(["--resume", out, "--no-progress"])
    train.run(cfg, log=logs.append)
    assert any("cannot be continued exactly" in m for m in logs), logs


def test_partial_record_fields_are_strict():
    good = {"base_loss": torch.zeros(2, dtype=torch.float64), "setup": None,
            "rows": {"w": torch.zeros(1, 2, dtype=torch.float64)}, "done": {"w": 1}, "chunk": {"w": 3}}
    assert PartialRun.from_state_dict(good).perturbations == 1
    for bad in ({**good, "done": {"w": True}}, {**good, "chunk": {}}, {**good, "setup": "torch"},
                {**good, "base_loss": torch.zeros(2)}):
        with pytest.raises(ValueError, match="partial estimate"):
            PartialRun.from_state_dict(bad)
