"""Workloads, sizes per mode, the engine adapter, correctness checks and the summary registry
for the benchmark suite. Imported by ``bench/conftest.py`` and ``bench/test_*.py``."""
from __future__ import annotations

import copy
import platform
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import baselines as B

# ----------------------------------------------------------------------------- modes and sizes
# quick: CI smoke run (tiny sizes, 1 round); default: <= 10 min on a 2-core CPU; full: GPU sizes.
SIZES = {
    "quick": dict(
        rounds=1, warmup=0, base_rounds=1, check_n=8, vmap_chunk=8,
        cnn=dict(batch=8, image=16, width=4),
        resnet=dict(batch=8, image=16, per_tensor=1),
        fc=dict(batch=8, image=16),
        layer3=dict(batch=8, image=16, per_tensor=2),
        rge=dict(batch=8, image=16, q=4),
        scaling=dict(image=16, batch=8, width=4, per_tensor=16,
                     batches=[4, 8], widths=[4, 8], variants=["K=1", "K=8", "budget=None"]),
    ),
    "default": dict(
        rounds=3, warmup=1, base_rounds=1, check_n=24, vmap_chunk=16,
        cnn=dict(batch=64, image=32, width=16),
        resnet=dict(batch=64, image=32, per_tensor=3),
        fc=dict(batch=64, image=32),
        layer3=dict(batch=64, image=32, per_tensor=8),
        rge=dict(batch=64, image=32, q=16),
        scaling=dict(image=32, batch=64, width=16, per_tensor=48,
                     batches=[16, 64, 256], widths=[8, 16, 32, 64],
                     variants=["K=1", "K=8", "K=64", "budget=16777216", "budget=None"]),
    ),
    "full": dict(
        rounds=5, warmup=2, base_rounds=1, check_n=32, vmap_chunk=64,
        cnn=dict(batch=64, image=32, width=16),
        resnet=dict(batch=256, image=32, per_tensor=8),
        fc=dict(batch=256, image=32),
        layer3=dict(batch=256, image=32, per_tensor=32),
        rge=dict(batch=256, image=32, q=64),
        scaling=dict(image=32, batch=256, width=16, per_tensor=256,
                     batches=[64, 256, 1024], widths=[16, 32, 64, 128],
                     variants=["K=1", "K=16", "K=128", "budget=268435456", "budget=None"]),
    ),
}

MU = 5e-3
BASELINES = ("reference", "no_reuse", "vmap", "fo")


def get_mode(config) -> str:
    if config.getoption("--full"):
        return "full"
    if config.getoption("--quick"):
        return "quick"
    return "default"


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu-" + _cpu_model()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def sync(dev=None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- engine adapter
def engine_available() -> bool:
    try:
        from deepzero_kernels import CGE  # noqa: F401
        return True
    except Exception:
        return False


def engine_backends() -> List[str]:
    """The engine backends to time: each one the package reports as available, else ``auto``."""
    if not engine_available():
        return []
    try:
        import deepzero_kernels.ops as ops
        rep = ops.backends()  # {name: (available, reason)}
        got = [b for b, v in rep.items() if b != "auto" and (v[0] if isinstance(v, tuple) else v)]
        if got:
            return got
    except Exception:
        pass
    return ["auto"]


def engine_unavailable() -> Dict[str, str]:
    """Backends the package reports as unavailable, with the reason."""
    try:
        import deepzero_kernels.ops as ops
        return {b: v[1] for b, v in ops.backends().items() if not v[0]}
    except Exception as e:  # engine not there
        return {"engine": repr(e)}


def make_cge(model, backend="auto", memory_budget=None, chunk_size=None):
    from deepzero_kernels import CGE
    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    return CGE(model, loss_fn=None, mu=MU, backend=backend, memory_budget=memory_budget, **kw)


def engine_chunks(cge, x, y, masks) -> dict:
    """The chunk sizes K the engine used on this batch (one untimed call with ``on_chunk``)."""
    ks = []
    cge.estimate(x, y, masks=masks, on_chunk=lambda name, k: ks.append(int(k)))
    if not ks:
        return {}
    return {"chunk_K_max": max(ks), "chunk_K_mean": sum(ks) / len(ks), "chunks": len(ks)}


# ----------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    coords: List[B.Coord]
    dense: bool                      # coords are every coordinate of the scope (masks=None ok)
    scope: List[str]                 # parameter names the workload covers
    sampled: bool = False            # coords are a sample: extrapolate to the dense scope
    methods: Sequence[str] = BASELINES
    state: dict = field(default_factory=dict)
    check_coords: List[B.Coord] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    _ref64: Optional[torch.Tensor] = None
    _blocks: Optional[list] = None

    def reset(self):
        """Put parameters and buffers back to the workload's initial state."""
        self.model.load_state_dict(self.state)
        self.model.train()

    # --- FLOPs
    def flops_setup(self):
        if self._blocks is None:
            flops, blocks = B.block_flops(self.model, self.x)
            self._blocks = blocks
            self.block_flops = flops
            self.owner = B.coords_block_index(self.model, blocks)
            self.tail_flops = [sum(flops[b:]) for b in range(len(flops))]
            self.forward_flops = sum(flops)

    def useful_flops(self, coords=None) -> float:
        """Dense FLOPs of the paper's per-coordinate work: the forward from the cached input
        of the coordinate's block (conv + linear multiply-adds x 2), summed over coordinates."""
        self.flops_setup()
        coords = self.coords if coords is None else coords
        return float(sum(self.tail_flops[self.owner[n]] for n, _ in coords))

    def dense_counts(self) -> Dict[int, int]:
        """Block index -> number of coordinates of the scope in it."""
        self.flops_setup()
        params = dict(self.model.named_parameters())
        out: Dict[int, int] = {}
        for n in self.scope:
            out[self.owner[n]] = out.get(self.owner[n], 0) + params[n].numel()
        return out

    def sample_counts(self) -> Dict[int, int]:
        self.flops_setup()
        out: Dict[int, int] = {}
        for n, _ in self.coords:
            out[self.owner[n]] = out.get(self.owner[n], 0) + 1
        return out

    def dense_useful_flops(self) -> float:
        return float(sum(c * self.tail_flops[b] for b, c in self.dense_counts().items()))

    def extrapolate(self, t0: float, group_times: Dict[int, float]) -> float:
        """Dense-step time: fixed part + per block (time per sampled coordinate x coordinates)."""
        n_s = self.sample_counts()
        return t0 + sum(max(group_times.get(b, 0.0), 0.0) / n_s[b] * c
                        for b, c in self.dense_counts().items() if b in n_s)

    # --- correctness
    def ref64(self) -> torch.Tensor:
        """The float64 reference on ``check_coords`` (cached)."""
        if self._ref64 is None:
            self.reset()
            m64 = copy.deepcopy(self.model).double()
            snap = B.snapshot_buffers(m64)
            with torch.no_grad():
                self.base_loss = float(B.per_sample_ce(m64(self.x.double()), self.y).mean())
            B.restore_buffers(m64, snap)
            self._ref64 = B.reference(m64, self.x.double(), self.y, self.check_coords, MU)
        return self._ref64

    def check_positions(self) -> torch.Tensor:
        pos = {c: k for k, c in enumerate(self.coords)}
        return torch.tensor([pos[c] for c in self.check_coords])


def _data(batch, image, seed=1, device=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image, image, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x.to(device), y.to(device)


def _finish(w: Workload, check_n: int) -> Workload:
    w.model.train()
    w.state = copy.deepcopy(w.model.state_dict())
    # check coordinates: evenly spread over the timed set, always including first and last
    n = len(w.coords)
    k = min(check_n, n)
    idx = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    w.check_coords = [w.coords[i] for i in idx]
    return w


def build_workload(name: str, mode: str) -> Workload:
    from deepzero_kernels.models import SimpleCNN, resnet20

    S = SIZES[mode]
    dev = bench_device()
    torch.manual_seed(0)
    if name == "cnn_appB":
        c = S["cnn"]
        model = SimpleCNN(3, 10, depth=2, width=c["width"]).to(dev)
        x, y = _data(c["batch"], c["image"], device=dev)
        scope = [n for n, p in model.named_parameters() if p.requires_grad]
        w = Workload(name, model, x, y, B.all_coords(model), True, scope)
    elif name == "resnet20_sampled":
        c = S["resnet"]
        model = resnet20().to(dev)
        x, y = _data(c["batch"], c["image"], device=dev)
        scope = [n for n, p in model.named_parameters() if p.requires_grad]
        w = Workload(name, model, x, y, B.sample_coords(model, c["per_tensor"], seed=0), False,
                     scope, sampled=True)
    elif name == "resnet20_fc":
        c = S["fc"]
        model = resnet20().to(dev)
        x, y = _data(c["batch"], c["image"], device=dev)
        scope = ["fc.weight", "fc.bias"]
        # the loop from the input over 650 coordinates is not informative here: reference + fo
        w = Workload(name, model, x, y, B.all_coords(model, scope), True, scope,
                     methods=("reference", "fo"))
    elif name == "resnet20_layer3":
        c = S["layer3"]
        model = resnet20().to(dev)
        x, y = _data(c["batch"], c["image"], device=dev)
        scope = [n for n, p in model.named_parameters() if n.startswith("layer3.")]
        w = Workload(name, model, x, y, B.sample_coords(model, c["per_tensor"], seed=0, names=scope),
                     False, scope, sampled=True, methods=("reference", "no_reuse", "vmap", "fo"))
    elif name.startswith("scaling_"):
        c = S["scaling"]
        batch, width = c["batch"], c["width"]
        kind, _, val = name[len("scaling_"):].partition("_")
        if kind == "batch":
            batch = int(val[1:])
        elif kind == "width":
            width = int(val[1:])
        model = SimpleCNN(3, 10, depth=2, width=width).to(dev)
        x, y = _data(batch, c["image"], device=dev)
        scope = [n for n, p in model.named_parameters() if p.requires_grad]
        w = Workload(name, model, x, y, B.sample_coords(model, c["per_tensor"], seed=0), False,
                     scope, sampled=True, methods=("reference",))
        w.info.update(batch=batch, width=width)
    else:
        raise KeyError(name)
    w.info.setdefault("batch", int(w.x.shape[0]))
    w.info["image"] = int(w.x.shape[-1])
    w.info["model"] = type(w.model).__name__
    return _finish(w, S["check_n"])


def workload_names(mode: str) -> List[str]:
    S = SIZES[mode]["scaling"]
    return (["cnn_appB", "resnet20_sampled", "resnet20_fc", "resnet20_layer3"]
            + ["scaling_chunk"]
            + [f"scaling_batch_B{b}" for b in S["batches"]]
            + [f"scaling_width_W{wd}" for wd in S["widths"]])


# ----------------------------------------------------------------------------- conv FLOP rate
def wall_times(fn, reps: int) -> List[float]:
    """Seconds of ``reps`` calls of ``fn``, each between device syncs, sorted."""
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)


def measure_conv_rate(mode: str) -> dict:
    """Dense F.conv2d throughput (FLOP/s, 2 x MACs) on a few ResNet-20-like shapes; the best
    median is the machine's dense conv rate the efficiencies are relative to."""
    dev = bench_device()
    shapes = [(64, 16, 32, 16), (64, 32, 16, 32), (64, 64, 8, 64), (256, 64, 8, 64)]
    if mode == "quick":
        shapes = shapes[:2]
    reps = 3 if mode == "quick" else 7
    out = {}
    for (b, cin, hw, cout) in shapes:
        x = torch.randn(b, cin, hw, hw, device=dev)
        w = torch.randn(cout, cin, 3, 3, device=dev)
        fl = 2.0 * b * cout * hw * hw * cin * 9
        with torch.no_grad():
            F.conv2d(x, w, padding=1)
            ts = wall_times(lambda: F.conv2d(x, w, padding=1), reps)
        out[f"B{b}_C{cin}->{cout}_{hw}x{hw}"] = fl / ts[len(ts) // 2]
    return {"flops_per_s": max(out.values()), "shapes": out}


# ----------------------------------------------------------------------------- FLOP counts
class _MatmulFlops(TorchDispatchMode):
    """Adds up the FLOPs of every convolution and matrix product that runs, by torch's own formulas
    (``torch.utils.flop_counter.flop_registry``). Not ``FlopCounterMode``: its module tracker
    registers global module hooks, and with those the engine (rightly) refuses its delta rules and
    runs whole-model forwards, so the count would describe another path."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out


def matmul_flops(fn) -> int:
    """Convolution and matrix-product FLOPs of one call of ``fn`` (run once more, untimed). The
    native backend's own kernels (one-channel convolutions and chains) are not aten ops and are not
    counted; the torch backend runs the same arithmetic through aten."""
    with torch.no_grad(), _MatmulFlops() as counter:
        fn()
    return counter.flops


# ----------------------------------------------------------------------------- registry
class Registry:
    """Everything the summary needs, filled by the tests."""

    def __init__(self):
        self.groups: Dict[str, dict] = {}
        self.conv = None
        self.mode = "default"
        self.notes: List[str] = []
        self.kernels: Dict[str, dict] = {}

    def record_kernel(self, case: str, backend: str, **kw):
        self.kernels.setdefault(case, {})[backend] = kw

    def record(self, group: str, method: str, **kw):
        g = self.groups.setdefault(group, {"methods": {}})
        g["methods"][method] = kw

    def set_group_info(self, group: str, **kw):
        g = self.groups.setdefault(group, {"methods": {}})
        g.update(kw)


REGISTRY = Registry()


def fp32_tolerance(ref64: torch.Tensor, base_loss: float) -> dict:
    """A float32 finite difference carries rounding noise ~ eps32 * |loss| / mu per sample; allow
    a generous multiple of it plus 1e-2 relative (catches wrong index/sign/scale, not rounding)."""
    noise = 64 * torch.finfo(torch.float32).eps * max(abs(base_loss), 1.0) / MU
    return dict(rtol=1e-2, atol=float(noise))


def median_time(benchmark) -> Optional[float]:
    st = getattr(benchmark, "stats", None)
    if st is None:
        return None
    s = getattr(st, "stats", st)
    return float(s.median)


def now() -> float:
    return time.perf_counter()
