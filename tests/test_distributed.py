"""Forward parallelism (eq. (5)) on torch.distributed: 2 CPU processes on gloo."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepzero_kernels import CGE
from deepzero_kernels.distributed import DistributedCGE, partition


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
    if rank == 0:
        torch.save({"g": g, "imb": est.last_imbalance, "secs": est.last_rank_seconds}, path)
    dist.destroy_process_group()


def test_distributed_gradient_equals_single_process(tmp_path):
    path = str(tmp_path / "g.pt")
    mp.spawn(_grad_worker, args=(2, free_port(), path), nprocs=2, join=True)
    got = torch.load(path)
    m, x, y, masks = _model()
    ref = CGE(m, mu=1e-3).estimate(x, y, masks)
    for n, r in ref.items():
        assert got["g"][n].dtype == torch.float64
        rel = (got["g"][n] - r).norm() / r.norm().clamp_min(1e-300)
        assert rel <= 1e-12, (n, rel)
    assert len(got["secs"]) == 2 and got["imb"] >= 1.0


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
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)


def test_resume_single_process_run_on_two_ranks(tmp_path, monkeypatch):
    from deepzero_kernels import train
    argv = [a if a != "1" or i == 0 or TINY[i - 1] != "--epochs" else "2" for i, a in enumerate(TINY)]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert train.main(argv + ["--threads", "1", "--out", full]) == 0

    def interrupt(epoch, step):
        if epoch == 1 and step == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "_on_step_end", interrupt)
    assert train.main(argv + ["--threads", "1", "--out", part]) == 130
    _run(["--resume", part], 2)  # finishes epoch 2 on 2 ranks
    w1, w2 = _weights(full), _weights(part)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
