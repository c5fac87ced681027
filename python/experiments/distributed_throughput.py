"""Throughput of forward-parallel CGE (eq. (5)) with 1 vs N ranks on this machine: the paper's
Fig. A6 (training iterations per hour against the number of workers).

    python python/experiments/distributed_throughput.py --quick    # about 40 s here
    python python/experiments/distributed_throughput.py            # 1 and 2 ranks, about 10 min here
    torchrun --nproc_per_node=2 python/experiments/distributed_throughput.py --worker [--cost C]

The launcher runs one process per measurement, each spawning its ranks on gloo (localhost);
``--worker`` and ``--cost`` are what it passes to each rank (not listed by ``--help``).

Every rank uses 1 thread (2 ranks on 2 cores). Reports perturbations/s (whole group), each
rank's estimation seconds per step and the imbalance max/mean over the measured steps. With N > 1
ranks it runs once per cost model (``--costs``): ``params`` and ``flops`` keep their initial
costs (no measured refinement, ``ema=0``), ``measured`` starts from FLOPs and refines with the
measured per-parameter times (the trainer's default).

Writes ``fig_a6.csv`` (one row per run), ``fig_a6.json``, ``fig_a6.md`` and ``fig_a6.png``
(iterations per hour, i.e. CGE estimates per hour, against ranks, one line per cost model) to
``--out``. The paper's Fig. A6 uses one GPU per worker; here every rank is a 1-thread process on
a CPU core, so the curve can only rise up to the number of cores.
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
    p.add_argument("--out", default="results/fig_a6", help="folder for fig_a6.csv, .json, .md and .png")
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
    results = []
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
        if not line:
            sys.exit(f"error: the run with {n} ranks produced no result (output above)")
        results.append(json.loads(line[0][7:]))
    write(a, results)


def write(a, results):
    """The run's table, JSON, markdown and plot (iterations per hour against ranks)."""
    import csv
    os.makedirs(a.out, exist_ok=True)
    one = next((r["s_per_step"] for r in results if r["ranks"] == 1), None)
    rows = [{"ranks": r["ranks"], "costs": r["costs"] or "-", "active": r["active"], "s_per_step": r["s_per_step"],
             "iterations_per_hour": 3600.0 / r["s_per_step"], "pert_per_s": r["pert_per_s"],
             "speedup_vs_1_rank": one / r["s_per_step"] if one else None, "imbalance_mean": r["imbalance_mean"]}
            for r in results]
    with open(os.path.join(a.out, "fig_a6.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    settings = {k: v for k, v in vars(a).items() if k not in ("worker", "cost")}
    with open(os.path.join(a.out, "fig_a6.json"), "w") as f:
        json.dump({"settings": settings, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "rows": rows, "runs": results}, f, indent=2)
    md = [f"{a.model}, {a.size}x{a.size} inputs, batch {a.batch}, density {a.density}, 1 thread per rank, "
          f"{os.cpu_count()} cores.\n", "| ranks | cost model | s/estimate | iterations/hour | speed-up | imbalance |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['ranks']} | {r['costs']} | {r['s_per_step']:.3f} | {r['iterations_per_hour']:,.0f} | "
           f"{r['speedup_vs_1_rank']:.2f}x | {r['imbalance_mean']:.3f} |" if r["speedup_vs_1_rank"] else
           f"| {r['ranks']} | {r['costs']} | {r['s_per_step']:.3f} | {r['iterations_per_hour']:,.0f} | | |"
           for r in rows]
    with open(os.path.join(a.out, "fig_a6.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    _plot(rows, os.path.join(a.out, "fig_a6.png"), a)
    print(f"wrote {a.out}/fig_a6.csv, fig_a6.json, fig_a6.md, fig_a6.png")


def _plot(rows, path, a):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    single = [r for r in rows if r["ranks"] == 1]
    for cost in dict.fromkeys(r["costs"] for r in rows if r["ranks"] > 1):
        rs = single + sorted((r for r in rows if r["costs"] == cost), key=lambda r: r["ranks"])
        ax.plot([r["ranks"] for r in rs], [r["iterations_per_hour"] for r in rs], "o-", label=f"cost model: {cost}")
    ax.set_xlabel("ranks (1-thread processes)")
    ax.set_ylabel("CGE estimates per hour")
    ax.set_xticks(sorted({r["ranks"] for r in rows}))
    ax.set_title(f"Fig. A6 here: {a.model}, batch {a.batch}, density {a.density}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
