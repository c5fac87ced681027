"""Forward parallelism (eq. (5)) on torch.distributed: 2 CPU processes on gloo."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepzero_kernels import CGE
from deepzero_kernels.distributed import DistributedCGE, flop_costs, partition
from deepzero_kernels.models import build_model


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(3 * 6 * 6, 5)).double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    masks = {"0.weight": torch.rand(3, 1, 3, 3) < 0.6}
    return m, x, y, masks


def _init(rank, world, port, timeout=20):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import datetime
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))


def _grad_worker(rank, world, port, path):
    _init(rank, world, port)
    m, x, y, masks = _model()
    est = DistributedCGE(m, mu=1e-3, check_every=1)
    for _ in range(2):  # second call uses measured costs: a different partition, same result
        g = est.estimate(x, y, masks)
    fixed = DistributedCGE(m, mu=1e-3, ema=0.0)  # FLOP costs kept: partition from shapes only
    g_fixed = fixed.estimate(x, y, masks)
    if rank == 0:
        torch.save({"g": g, "imb": est.last_imbalance, "secs": est.last_rank_seconds, "g_fixed": g_fixed,
                    "origins": [est.costs_from, fixed.costs_from], "fixed_costs": fixed.costs,
                    "share": fixed.last_share}, path)
    dist.destroy_process_group()


def test_distributed_gradient_equals_single_process(tmp_path):
    path = str(tmp_path / "g.pt")
    mp.spawn(_grad_worker, args=(2, free_port(), path), nprocs=2, join=True)
    got = torch.load(path)
    m, x, y, masks = _model()
    ref = CGE(m, mu=1e-3).estimate(x, y, masks)
    for key in ("g", "g_fixed"):
        for n, r in ref.items():
            assert got[key][n].dtype == torch.float64
            rel = (got[key][n] - r).norm() / r.norm().clamp_min(1e-300)
            assert rel <= 1e-12, (key, n, rel)
    assert len(got["secs"]) == 2 and got["imb"] >= 1.0
    assert got["origins"] == ["measured", "flops"]
    fl = flop_costs(m, x)
    assert got["fixed_costs"] == [fl[n] for n, _ in m.named_parameters()]
    counts = [int(masks[n].sum()) if n in masks else p.numel() for n, p in m.named_parameters()]
    assert got["share"] == sum(b - a for _, a, b in partition(counts, got["fixed_costs"], 2)[0])


def _hang_worker(rank, world, port, path, mode):
    _init(rank, world, port, timeout=3)
    m, x, y, masks = _model()
    est = DistributedCGE(m, mu=1e-3, check_every=0)
    if rank == 1:  # dies, or hangs, before the first collective
        if mode == "hang":
            time.sleep(60)
        os._exit(0)
    t0 = time.perf_counter()
    try:
        est.estimate(x, y, masks)
    except RuntimeError as e:
        with open(path, "w") as f:
            f.write(f"{time.perf_counter() - t0:.2f}\n{e}")
        os._exit(0)
    os._exit(3)


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_hung_rank_fails_the_other_within_timeout(tmp_path, mode):
    path = str(tmp_path / "err.txt")
    ctx = mp.get_context("spawn")
    port = free_port()
    ps = [ctx.Process(target=_hang_worker, args=(r, 2, port, path, mode)) for r in range(2)]
    for p in ps:
        p.start()
    ps[0].join(25)
    hung = ps[0].is_alive()
    for p in ps:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, "rank 0 hung"
    secs, msg = open(path).read().split("\n", 1)
    assert float(secs) < 15 and "another rank died or hung" in msg


def _diverge_worker(rank, world, port, path):
    _init(rank, world, port)
    m, x, y, masks = _model()
    if rank == 1:
        with torch.no_grad():
            m[0].weight[0, 0, 0, 0] += 1e-9
    est = DistributedCGE(m, mu=1e-3, check_every=1)
    try:
        est.estimate(x, y, masks)
    except RuntimeError as e:
        if rank == 0:
            open(path, "w").write(str(e))
    dist.destroy_process_group()


def test_divergence_is_detected(tmp_path):
    path = str(tmp_path / "div.txt")
    mp.spawn(_diverge_worker, args=(2, free_port(), path), nprocs=2, join=True)
    assert "diverged" in open(path).read()


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_partition_covers_once_and_balances(world):
    counts = [0, 17, 100, 3, 250]
    costs = [5.0, 4.0, 2.5, 1.0, 0.1]
    parts = partition(counts, costs, world)
    seen = [torch.zeros(n, dtype=torch.int64) for n in counts]
    load = []
    for r in range(world):
        c = 0.0
        for k, a, b in parts[r]:
            seen[k][a:b] += 1
            c += (b - a) * costs[k]
        load.append(c)
    assert all(bool((s == 1).all()) for s in seen)
    total = sum(n * c for n, c in zip(counts, costs))
    for c in load:
        assert abs(c - total / world) <= max(costs) + 1e-9
    assert partition(counts, costs, world) == parts  # deterministic


TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-size", "48,24",
        "--model", "cnn", "--width", "4", "--depth", "2", "--batch-size", "16", "--no-progress",
        "--estimator", "cge", "--sparsity-method", "random", "--sparsity", "0.5", "--epochs", "1"]


# Ranks chunk different subsets (and measured costs move the split), so runs agree up to float32
# rounding, not bitwise: 1e-7 in a loss difference / mu = 5e-3 is 2e-5 in a gradient coordinate,
# 2e-6 in a weight after one step at lr 0.1.
CLOSE = dict(rtol=1e-4, atol=1e-5)


def _run(argv, nproc, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "deepzero_kernels.train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "deepzero_kernels.train"]
    r = subprocess.run(cmd + argv, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _weights(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]


def test_torchrun_training_matches_single_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run(TINY + ["--threads", "1", "--out", one], 1)
    r = _run(TINY + ["--threads", "1", "--out", two], 2)
    assert r.stdout.count("best test acc") == 1 and "imbalance" in r.stdout  # only rank 0 prints
    w1, w2 = _weights(one), _weights(two)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], **CLOSE)


def test_flop_costs_app_b_cnn():
    m = build_model("cnn", in_channels=3, num_classes=10, depth=2, width=8).train()
    x = torch.randn(8, 3, 16, 16)
    bufs = {n: b.clone() for n, b in m.named_buffers()}
    c = flop_costs(m, x)
    assert all(torch.equal(b, bufs[n]) for n, b in m.named_buffers())  # BN running stats untouched
    assert flop_costs(m, x) == c  # shapes only: the same on every rank
    names = [n for n, _ in m.named_parameters()]
    assert list(c) == names
    vals = [c[n] for n in names]
    # later layers are cheaper: less work after them (feature reuse)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert c["features.0.weight"] > 10 * c["features.4.weight"] > 10 * c["fc.weight"]
    # fc: a one-logit delta, the loss in closed form: B elements
    assert c["fc.weight"] == c["fc.bias"] == x.shape[0]
    # conv0 pays at least the dense second conv (2 * MACs / the 8 channels it sees the delta in)
    assert c["features.0.weight"] >= 2 * x.shape[0] * 8 * 8 * 8 * 9 * 8 / 8
    # the FLOP partition balances FLOPs, so the rank with the early layers gets few coordinates
    counts = [p.numel() for p in m.parameters()]
    parts = partition(counts, vals, 2)
    load = [sum((b - a) * vals[k] for k, a, b in part) for part in parts]
    assert abs(load[0] - load[1]) <= max(vals)
    n0, n1 = (sum(b - a for _, a, b in part) for part in parts)
    assert n0 < n1 / 5


def test_flop_costs_untraceable_model_is_none():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent: fx cannot trace
    assert flop_costs(Branchy(), torch.randn(2, 4)) is None


EPOCHS2 = [a if i == 0 or TINY[i - 1] != "--epochs" else "2" for i, a in enumerate(TINY)] + ["--threads", "1"]


@pytest.fixture(scope="module")
def full_single(tmp_path_factory):
    """An uninterrupted 2-epoch single-process run: the reference of the resume tests."""
    from deepzero_kernels import train
    out = str(tmp_path_factory.mktemp("full") / "run")
    assert train.main(EPOCHS2 + ["--out", out]) == 0
    return out


def _stop(epoch, step):
    if (epoch, step) == (1, 1):  # mid-epoch 2
        raise KeyboardInterrupt


def _train_worker(rank, world, port, argv, interrupt, seen_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from deepzero_kernels import train
    from deepzero_kernels import distributed as DZD
    seen = {}
    init, cls = DZD.init_from_env, DZD.DistributedCGE

    class Recording(cls):  # records what the trainer passed on
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["check_every"] = self.check_every
    DZD.init_from_env = lambda timeout_s=300.0, **k: (seen.update(timeout=timeout_s), init(timeout_s, **k))[1]
    DZD.DistributedCGE = Recording
    if interrupt:
        train._on_step_end = _stop
    code = train.main(argv)
    assert code == (130 if interrupt else 0), code
    if rank == 0 and seen_path:
        torch.save(seen, seen_path)


def _spawn_train(argv, world, interrupt=False, seen_path=None):
    mp.spawn(_train_worker, args=(world, free_port(), argv, interrupt, seen_path), nprocs=world, join=True)


def _history(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _assert_matches(ref, got):
    w1, w2 = _weights(ref), _weights(got)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], **CLOSE)
    h1, h2 = _history(ref), _history(got)
    assert [h["epoch"] for h in h2] == [1, 2]
    for a, b in zip(h1, h2):
        assert a["perturbations"] == b["perturbations"]
        assert abs(a["test_acc"] - b["test_acc"]) <= 1 / 24 + 1e-9  # at most one of 24 test samples


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """``interrupted(ranks)``: a run stopped mid-epoch 2 on that many ranks (made once, copied)."""
    from deepzero_kernels import train
    made = {}

    def get(ranks, dest):
        if ranks not in made:
            out = str(tmp_path_factory.mktemp(f"stopped{ranks}") / "run")
            if ranks == 1:
                train._on_step_end, saved = _stop, train._on_step_end
                try:
                    assert train.main(EPOCHS2 + ["--out", out]) == 130
                finally:
                    train._on_step_end = saved
            else:
                _spawn_train(EPOCHS2 + ["--out", out], ranks, interrupt=True)
            ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
            assert (ck["state"]["epoch"], ck["state"]["step"]) == (1, 1)
            made[ranks] = out
        shutil.copytree(made[ranks], dest)
        return dest
    return get


@pytest.mark.parametrize("before,after", [(1, 2), (2, 1), (2, 2)])
def test_resume_with_a_different_number_of_ranks(tmp_path, full_single, interrupted, before, after):
    from deepzero_kernels import train
    part = interrupted(before, str(tmp_path / "part"))
    resume = ["--resume", part, "--no-progress"]
    if after == 1:
        assert train.main(resume) == 0
    else:  # the flags reach the process group and the estimator; env vars are the fallback
        seen = str(tmp_path / "seen.pt")
        os.environ["DZ_DIST_TIMEOUT"] = "45"
        try:
            _spawn_train(resume + ["--check-every", "1"], after, seen_path=seen)
        finally:
            del os.environ["DZ_DIST_TIMEOUT"]
        assert torch.load(seen) == {"timeout": 45.0, "check_every": 1}
    _assert_matches(full_single, part)
    h = _history(part)
    assert ("ranks" in h[0]) == (before > 1) and ("ranks" in h[1]) == (after > 1)


def test_dist_flags_override_env(monkeypatch):
    from deepzero_kernels import train
    monkeypatch.setenv("DZ_DIST_TIMEOUT", "12.5")
    monkeypatch.setenv("DZ_CHECK_EVERY", "3")
    cfg, _ = train.parse_args([])
    assert (train.dist_setting(cfg, "dist_timeout"), train.dist_setting(cfg, "check_every")) == (12.5, 3)
    cfg, _ = train.parse_args(["--dist-timeout", "7", "--check-every", "0"])
    assert (train.dist_setting(cfg, "dist_timeout"), train.dist_setting(cfg, "check_every")) == (7.0, 0)
    monkeypatch.delenv("DZ_DIST_TIMEOUT")
    monkeypatch.delenv("DZ_CHECK_EVERY")
    cfg, _ = train.parse_args([])
    assert (train.dist_setting(cfg, "dist_timeout"), train.dist_setting(cfg, "check_every")) == (300.0, 10)
    for bad in (["--dist-timeout", "0"], ["--check-every", "-1"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad)
        assert e.value.code == 2
    monkeypatch.setenv("DZ_CHECK_EVERY", "often")
    with pytest.raises(SystemExit):
        train.parse_args([])
