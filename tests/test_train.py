"""Trainer CLI: smoke runs on tiny synthetic data, exact resume, checkpoint errors, bad flags.

Runs call ``train.main(argv)`` in-process (no interpreter start-up per run); one test runs the
real ``python -m deepzero_kernels.train`` to check the module entry point.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from deepzero_kernels import train

TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-size", "48,24",
        "--model", "cnn", "--width", "4", "--depth", "2", "--batch-size", "16", "--grasp-q", "4",
        "--no-progress", "--threads", "1"]


def engine_available():
    try:
        from deepzero_kernels import CGE  # noqa: F401
        return True
    except ImportError:
        return False


needs_engine = pytest.mark.skipif(not engine_available(), reason="the CGE engine is not importable")


def test_fo_smoke_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--estimator", "fo", "--sparsity", "0", "--epochs", "1", "--out", str(out)]) == 0
    for f in ("metrics.jsonl", "metrics.csv", "config.json", "checkpoint.pt", "best.pt", "summary.json", "metrics.png"):
        assert (out / f).is_file(), f
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and rec[0]["epoch"] == 1 and 0 <= rec[0]["test_acc"] <= 1
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].split(",")[0] == "epoch" and rows[1].split(",")[0] == "1"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["estimator"] == "fo" and cfg["derived"]["steps_per_epoch"] == 3
    assert cfg["derived"]["backend"] == "none" and cfg["derived"]["threads"] == 1
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["test_acc"] == rec[0]["test_acc"]
    summ = json.loads((out / "summary.json").read_text())
    assert summ["best_epoch"] == 1 and summ["epochs_done"] == 1 and not summ["interrupted"]
    assert "best test acc" in capsys.readouterr().out


@needs_engine
@pytest.mark.parametrize("estimator,method", [("cge", "zo_grasp"), ("rge", "random")])
def test_zo_smoke(tmp_path, estimator, method):
    out = tmp_path / "run"
    argv = TINY + ["--estimator", estimator, "--sparsity-method", method, "--sparsity", "0.5",
                   "--epochs", "1", "--q", "8", "--out", str(out)]
    assert train.main(argv) == 0
    dens = json.loads((out / "densities.json").read_text())
    assert set(dens["layers"]) == {"features.0.weight", "features.4.weight", "fc.weight"}
    derived = json.loads((out / "config.json").read_text())["derived"]
    assert derived["backend"] in (("torch", "native", "triton") if estimator == "cge" else ("none",))
    assert abs(dens["overall"] - 0.5) < 0.02
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["state"]["epoch"] == 1 and ck["state"]["perturbations"] > 0
    for name, m in ck["masks"].items():
        assert abs(m.float().mean().item() - dens["layers"][name]) < 0.02


@needs_engine
def test_delta_precision_flag_reaches_the_estimator(tmp_path):
    cfg, _ = train.parse_args(TINY + ["--estimator", "cge", "--delta-precision", "bf16", "--out", str(tmp_path / "r")])
    est, _ = train.build_estimator(cfg, train.build_model("cnn", in_channels=1, width=4))
    assert est.engine.delta_precision == "bf16"
    assert est.engine.base_precision == "fp64"  # the default
    cfg, _ = train.parse_args(TINY + ["--estimator", "cge", "--base-precision", "model", "--out", str(tmp_path / "m")])
    est, _ = train.build_estimator(cfg, train.build_model("cnn", in_channels=1, width=4))
    assert est.engine.base_precision == "model"


def _final_weights(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]


def _history(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "perturbations_per_s")}
            for line in open(os.path.join(out, "metrics.jsonl"))]


@needs_engine
@pytest.mark.parametrize("stop_at", [(0, 3), (1, 1)], ids=["after-epoch-1", "mid-epoch-2"])
def test_resume_is_bitwise_exact(tmp_path, monkeypatch, stop_at):
    argv = TINY + ["--estimator", "cge", "--sparsity", "0.5", "--mask-interval", "1", "--epochs", "3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert train.main(argv + ["--out", full]) == 0

    def interrupt(epoch, step):
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "_on_step_end", interrupt)
    assert train.main(argv + ["--out", part]) == 130
    ck = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    assert (ck["state"]["epoch"], ck["state"]["step"]) == stop_at
    monkeypatch.setattr(train, "_on_step_end", lambda e, s: None)
    assert train.main(["--resume", part, "--no-progress"]) == 0

    a, b = _final_weights(full), _final_weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise, buffers (BN running stats) included
    assert _history(full) == _history(part)
    # Resuming a finished run does nothing and succeeds.
    assert train.main(["--resume", part, "--no-progress"]) == 0
    assert len(_history(part)) == 3


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    base = TINY + ["--estimator", "fo", "--sparsity", "0", "--epochs", "1"]
    assert train.main(base + ["--out", str(out)]) == 0
    (out / "checkpoint.pt").write_bytes(b"garbage")
    assert train.main(["--resume", str(out), "--no-progress"]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == b"garbage"  # never overwritten


def test_mismatched_checkpoint_and_existing_run(tmp_path, capsys):
    out = tmp_path / "run"
    base = TINY + ["--estimator", "fo", "--sparsity", "0", "--epochs", "2"]
    assert train.main(base + ["--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    # A fresh run must not overwrite an existing one.
    assert train.main(base + ["--out", str(out)]) == 1
    assert "already holds a run" in capsys.readouterr().err
    # config.json edited so that it no longer matches the checkpoint.
    cfg = json.loads((out / "config.json").read_text())
    cfg["config"]["width"] = 8
    (out / "config.json").write_text(json.dumps(cfg))
    assert train.main(["--resume", str(out), "--no-progress"]) == 1
    assert "does not match" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    # Resuming with a different training flag is a usage error.
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(out), "--lr", "0.5"])
    assert e.value.code == 2


@pytest.mark.parametrize("bad", [
    ["--sparsity", "1.0"], ["--sparsity", "-0.1"], ["--sparsity", "nan"], ["--mu", "0"], ["--mu", "-1e-3"],
    ["--model", "vgg"], ["--estimator", "sgd"], ["--epochs", "0"], ["--lr", "0"], ["--batch-size", "0"],
    ["--mask-interval", "0"], ["--momentum", "1.0"], ["--warmup-epochs", "30", "--epochs", "5"],
    ["--sparsity", "0.9", "--sparsity-method", "none"], ["--synthetic-shape", "3,x"], ["--q", "-1"],
    ["--width", "0"], ["--resume", "/nonexistent/run"], ["--device", "nonsense"], ["--unknown-flag"],
])
def test_bad_flags_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(bad)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_entry_point_help():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "deepzero_kernels.train", "--help"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0
    for flag in ("--dataset", "--sparsity-method", "--mask-interval", "--resume", "--warmup-epochs"):
        assert flag in r.stdout
    assert "default: 5e-3" in r.stdout.replace("0.005", "5e-3") and "resnet20" in r.stdout


def test_train_state_round_trips_through_the_checkpoint(tmp_path):
    """TrainState -> checkpoint file -> fresh objects: the keys of checkpoints written before
    TrainState existed, and every object and counter restored exactly."""
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "cosine", "warmup_epochs": 1,
               "epochs": 2}
        opt, sched = train.build_optimizer(cfg, model, steps_per_epoch=3)
        return model, opt, sched, train.generators(7)

    model, opt, sched, gens = fresh()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    sched.step()
    gens["data"].manual_seed(11)
    state = train.TrainState(model, opt, sched, gens, masks={"0.weight": torch.rand(4, 3) > 0.5},
                             densities={"0.weight": 0.5}, grasp={"queries": 10}, epoch=1, step=2,
                             perm=torch.randperm(6), history=[{"epoch": 1}], best_acc=0.5, best_epoch=1,
                             elapsed=3.0, perturbations=40, forwards=44)
    state.ep["n"] = 16
    torch.save(state.to_checkpoint({"seed": 7}), tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert set(ck) == {"format", "partial"} | set(train._CHECKPOINT_FIELDS) and train.checkpoint_problem(ck) is None
    assert list(ck["state"]) == ["epoch", "step", "perm", "history", "best_acc", "best_epoch", "elapsed",
                                 "perturbations", "forwards", "ep"]
    back = train.TrainState.from_checkpoint(ck, *fresh(), device=torch.device("cpu"))
    for k, v in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k
    assert back.opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert back.sched.state_dict()["last_epoch"] == 1
    assert all(torch.equal(back.gens[k].get_state(), g.get_state()) for k, g in gens.items())
    assert torch.equal(back.masks["0.weight"], state.masks["0.weight"]) and torch.equal(back.perm, state.perm)
    for k in train.TrainState.COUNTERS + ("densities", "grasp"):
        if k != "perm":
            assert getattr(back, k) == getattr(state, k), k


def test_lr_schedule_shape():
    s = train.LRSchedule("cosine", warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5) and s(110) == pytest.approx(0.0)
    st = train.LRSchedule("step", warmup_steps=0, total_steps=100)
    assert [st(0), st(50), st(75)] == pytest.approx([1.0, 0.1, 0.01])


@pytest.mark.slow
def test_default_run_reaches_90_percent():
    summary = train.run(train.parse_args(["--no-progress"])[0])
    assert summary["best_test_acc"] >= 0.90
    assert summary["wall_seconds"] <= 300


@needs_engine
@pytest.mark.parametrize("estimator", ["cge", "rge", "fo"])
def test_dry_run_prints_the_cost_and_writes_nothing(tmp_path, capsys, estimator):
    out = tmp_path / "run"
    assert train.main(TINY + ["--estimator", estimator, "--epochs", "3", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("cost:"))
    assert "/step" in line and "/epoch" in line and "for 9 steps in 3 epochs" in line, line
    if estimator == "cge":
        assert "queries/step" in line and "calibration:" in line
    assert not out.exists(), "a dry run must not create --out"
    assert "epoch   1/3" not in text and "engine:" not in text, "a dry run must not train"


@needs_engine
def test_max_hours_refuses_a_run_projected_over_it(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--epochs", "1", "--max-hours", "1e-9", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "projected to take" in err and "--max-hours" in err
    assert not (out / "checkpoint.pt").exists()
    # A generous limit runs, and the log shows the projection before training.
    assert train.main(TINY + ["--epochs", "1", "--max-hours", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.index("cost:") < text.index("epoch   1/1")


def test_max_hours_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--max-hours", "0"])
    assert e.value.code == 2 and "--max-hours must be > 0" in capsys.readouterr().err


@needs_engine
def test_calibration_leaves_the_run_unchanged(tmp_path):
    """The projection trains nothing: weights after a run equal those of the same run whose
    calibration is skipped (bitwise), for CGE and backprop (BatchNorm buffers, gradients)."""
    for est in ("cge", "fo"):
        outs = []
        for skip in (False, True):
            out = tmp_path / f"{est}-{skip}"
            argv = TINY + ["--estimator", est, "--epochs", "1", "--out", str(out)]
            if skip:
                orig = train._check_cost
                train._check_cost = lambda *a, **k: None
                try:
                    assert train.main(argv) == 0
                finally:
                    train._check_cost = orig
            else:
                assert train.main(argv) == 0
            outs.append(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
        assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0]), est


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "python", "examples")
OWN = ["--model", "own_model_and_data:make_model", "--epochs", "1", "--batch-size", "64", "--grasp-q", "4",
       "--no-progress", "--threads", "1"]


@needs_engine
def test_own_model_and_data_from_the_command_line(tmp_path, monkeypatch, capsys):
    """--model/--dataset package.module:factory and a .npz file (python/examples/own_model_and_data.py);
    the run resumes from its config (the specs are stored)."""
    monkeypatch.syspath_prepend(EXAMPLES)
    import own_model_and_data as own
    out = tmp_path / "run"
    assert train.main(OWN + ["--dataset", "own_model_and_data:make_data", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model own_model_and_data:make_model" in text and "no fallback" in text
    assert json.loads((out / "config.json").read_text())["derived"]["dataset"]["input_shape"] == [1, 12, 12]
    data = own.make_data()
    np_path = tmp_path / "d.npz"
    import numpy as np
    np.savez(np_path, **data)
    pt_path = tmp_path / "d.pt"
    torch.save({k: torch.as_tensor(v) for k, v in data.items()}, pt_path)
    for path in (np_path, pt_path):
        assert train.main(OWN + ["--dataset", str(path)]) == 0, path
    assert train.main(["--resume", str(out), "--epochs", "1", "--no-progress"]) == 0


@pytest.mark.parametrize("flags,msg", [
    (["--model", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--model", "own_model_and_data:nothing"], "has no attribute 'nothing'"),
    (["--model", "vgg"], "invalid choice 'vgg'"),
    (["--dataset", "own_model_and_data:TinyNet"], "the factory failed (TypeError"),
    (["--dataset", "builtins:object"], "returned object"),
    (["--dataset", "builtins:dict"], "returned a dict without x_train"),
    (["--dataset", "imagenet"], "invalid choice 'imagenet'"),
])
def test_bad_model_or_dataset_specs_are_clear_errors(flags, msg, monkeypatch, capsys):
    monkeypatch.syspath_prepend(EXAMPLES)
    code = None
    try:
        code = train.main(OWN + flags)
    except SystemExit as e:
        code = e.code
    assert code in (1, 2)
    assert msg in capsys.readouterr().err


def test_bad_dataset_files_are_clear_errors(tmp_path, capsys):
    import numpy as np
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 1, 4, 4), np.float32), y_train=np.zeros(4, np.int64))
    assert train.main(TINY[6:] + ["--dataset", str(bad)]) == 1
    assert "must hold x_train, y_train, x_test, y_test" in capsys.readouterr().err
    float_labels = tmp_path / "f.npz"
    np.savez(float_labels, x_train=np.zeros((4, 1, 4, 4), np.float32), y_train=np.zeros(4, np.float32),
             x_test=np.zeros((2, 1, 4, 4), np.float32), y_test=np.zeros(2, np.int64))
    assert train.main(TINY[6:] + ["--dataset", str(float_labels)]) == 1
    assert "y_train must be (N,) integer class labels" in capsys.readouterr().err
    garbage = tmp_path / "g.pt"
    garbage.write_bytes(b"not a torch file")
    assert train.main(TINY[6:] + ["--dataset", str(garbage)]) == 1
    assert "cannot read dataset file" in capsys.readouterr().err
    assert train.main(TINY[6:] + ["--dataset", str(tmp_path / "missing.npz")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_resume_with_more_epochs_extends_a_finished_run(tmp_path, capsys):
    """--resume DIR --epochs N past the saved length continues the run (lr schedule recomputed for
    N epochs, config.json updated); fewer epochs than saved is still an error."""
    out = tmp_path / "run"
    base = TINY + ["--estimator", "fo", "--sparsity", "0"]
    assert train.main(base + ["--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(out), "--epochs", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "extending the run from 1 to 3 epochs" in text
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rec] == [1, 2, 3]
    assert rec[1]["lr"] > rec[2]["lr"] == pytest.approx(0.0, abs=1e-12), "cosine to 0 over the new length"
    assert rec[1]["lr"] > 0
    assert json.loads((out / "config.json").read_text())["config"]["epochs"] == 3
    assert train.main(["--resume", str(out), "--no-progress"]) == 0  # finished: nothing left to do
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(out), "--epochs", "2", "--no-progress"])
    assert e.value.code == 2 and "differs from the run being resumed" in capsys.readouterr().err


@needs_engine
def test_log_says_what_happens_before_training(capsys):
    """Before the first epoch line: the projected cost, then ZO-GraSP's start and end, then the
    engine's report after the first step."""
    assert train.main(TINY + ["--epochs", "1", "--sparsity", "0.5"]) == 0
    text = capsys.readouterr().out
    marks = ["cost:", "ZO-GraSP: scoring", "ZO-GraSP: done in", "engine:", "epoch   1/1"]
    pos = [text.index(m) for m in marks]
    assert pos == sorted(pos), text
