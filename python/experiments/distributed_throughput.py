"""Throughput of forward-parallel CGE (eq. (5)) with 1 vs N ranks on this machine.

    python python/experiments/distributed_throughput.py --quick    # about 40 s here
    python python/experiments/distributed_throughput.py            # launches 1 and 2 ranks
    torchrun --nproc_per_node=2 python/experiments/distributed_throughput.py --worker [--cost C]

The launcher runs one process per measurement, each spawning its ranks on gloo (localhost);
``--worker`` and ``--cost`` are what it passes to each rank (not listed by ``--help``).

Every rank uses 1 thread (2 ranks on 2 cores). Reports perturbations/s (whole group), each
rank's estimation seconds per step and the imbalance max/mean over the measured steps. With N > 1
ranks it runs once per cost model (``--costs``): ``params`` and ``flops`` keep their initial
costs (no measured refinement, ``ema=0``), ``measured`` starts from FLOPs and refines with the
measured per-parameter times (the trainer's default).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time


def worker(a):
    import torch  # here, not at the top: the launcher and --help need no torch
    torch.set_num_threads(1)
    from deepzero_kernels import CGE
    from deepzero_kernels.models import build_model
    from deepzero_kernels import distributed as DZD
    dist_on = DZD.init_from_env(60.0)
    torch.manual_seed(0)
    model = build_model(a.model, in_channels=3, num_classes=10, image_size=a.size)
    x = torch.randn(a.batch, 3, a.size, a.size)
    y = torch.randint(0, 10, (a.batch,))
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < a.density for n, p in model.named_parameters()}
    if dist_on:
        kw = {"measured": {}, "flops": {"ema": 0.0}, "params": {"ema": 0.0, "initial_costs": "params"}}[a.cost]
        est = DZD.DistributedCGE(model, check_every=0, **kw)
    else:
        est = CGE(model)
    secs, imbs, ranks = [], [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        est.estimate(x, y, masks)
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            secs.append(dt)
            if dist_on:
                imbs.append(est.last_imbalance)
                ranks.append(est.last_rank_seconds)
    n_active = sum(int(m.sum()) for m in masks.values())
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", 1))
        mean = sum(secs) / len(secs)
        res = {"ranks": world, "costs": a.cost if dist_on else None, "model": a.model,
               "active": n_active, "s_per_step": mean,
               "pert_per_s": n_active / mean,
               "imbalance_mean": sum(imbs) / len(imbs) if imbs else 1.0,
               "imbalance_per_step": imbs,
               "rank_seconds_last": ranks[-1] if ranks else [mean],
               "rank0_share": est.last_share if dist_on else n_active}
        print("RESULT " + json.dumps(res), flush=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank (the launcher's)
    p.add_argument("--cost", default="measured", choices=("measured", "flops", "params"),
                   help=argparse.SUPPRESS)  # the cost model of a --worker rank
    p.add_argument("--model", default="resnet20", help="deepzero_kernels.models.build_model name")
    p.add_argument("--size", type=int, default=16, help="side of the random square 3-channel inputs")
    p.add_argument("--batch", type=int, default=16, help="batch size")
    p.add_argument("--density", type=float, default=0.05,
                   help="fraction of every parameter's coordinates estimated (random masks)")
    p.add_argument("--steps", type=int, default=4, help="measured CGE estimates per run")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured estimates before them")
    p.add_argument("--ranks", default="1,2", help="comma-separated process counts, one run each")
    p.add_argument("--costs", default="params,flops,measured", help="cost models tried with N > 1 ranks")
    p.add_argument("--quick", action="store_true",
                   help="inputs 8x8, batch 8, density 0.01, 1 warm-up + 2 steps (about 40 s here)")
    return p


def main():
    a = build_parser().parse_args()
    if a.worker:
        return worker(a)
    if a.quick:
        a.size, a.batch, a.density, a.steps, a.warmup = 8, 8, 0.01, 2, 1
    rest = [f"--model={a.model}", f"--size={a.size}", f"--batch={a.batch}", f"--density={a.density}",
            f"--steps={a.steps}", f"--warmup={a.warmup}", "--worker"]
    runs = [(n, c) for n in map(int, a.ranks.split(",")) for c in (a.costs.split(",") if n > 1 else ["-"])]
    for n, cost in runs:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if n == 1:
            cmd = [sys.executable, __file__] + rest
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", __file__] + rest + [f"--cost={cost}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        print(line[0][7:] if line else out.stdout + out.stderr, flush=True)


if __name__ == "__main__":
    main()
