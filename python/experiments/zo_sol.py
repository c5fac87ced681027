"""Solver-in-the-loop error correction trained by DeepZero (paper Sec. 6.2, App. H, Fig. 6).

A coarse incompressible Navier-Stokes solver (NumPy, a black box to ZO training) is corrected
after every step by a small CNN, ``s_{t+1} = P(s_t) + C_theta(P(s_t))``, so that it tracks a 4x
finer simulation of the same flow (downsampled). Four ways to get the correction:

* SRC:    none (the coarse solver alone).
* NON:    C trained off-line (backprop) on pre-generated one-step pairs ``P(y_t) -> y_{t+1}``.
* ZO-SOL: C trained through n unrolled solver steps, loss (A3), by sparse CGE
          (``deepzero_kernels.CGE(model, loss_fn=tail)``); the solver is only queried.
* FO-SOL: the same loss with backprop through a torch twin of the solver.

Flow: 2-D decaying turbulence on a periodic [0, 2pi]^2 box, staggered (MAC) grid, first-order
semi-Lagrangian advection, implicit viscous diffusion and an exact discrete pressure
projection (both by FFT). Reynolds numbers Re = U L / nu (U = 1 rms, L = 2pi) are the paper's:
train {97.7, ..., 3125}, test {146.5, ..., 2343.8}, each simulation with its own random initial
vortices, so train and test are disjoint in Re and initial condition.

    python python/experiments/zo_sol.py --quick --out results/zo_sol_quick   # 25 s to 2 min here
    python python/experiments/zo_sol.py --out results/zo_sol                 # full run

Writes ``zo_sol.md``, ``zo_sol.csv``, ``zo_sol.json`` and ``zo_sol.png`` (error vs time step) to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time


def build_parser():
    """The flags; the defaults are the full run (``parse_args`` applies ``--quick``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--grid", type=int, default=16, help="coarse grid cells per side")
    ap.add_argument("--factor", type=int, default=4, help="high-res grid = factor x coarse")
    ap.add_argument("--dt", type=float, default=0.1,
                    help="time step of the coarse solver (the high-res one takes 4 substeps per dt)")
    ap.add_argument("--steps", type=int, default=100, help="time steps T of every simulation")
    ap.add_argument("--sims-per-re", type=int, default=3, help="initial conditions per Reynolds number")
    ap.add_argument("--k0", type=float, default=3.0, help="peak wavenumber of the initial vortices")
    ap.add_argument("--width", type=int, default=8, help="hidden channels of the corrector")
    ap.add_argument("--unroll", type=int, default=16, help="n in (A3)")
    ap.add_argument("--windows", type=int, default=4, help="unroll windows per SOL step")
    ap.add_argument("--non-epochs", type=int, default=50, help="NON training epochs (one-step pairs, backprop)")
    ap.add_argument("--non-lr", type=float, default=1e-3, help="NON Adam lr (cosine decay)")
    ap.add_argument("--zo-steps", type=int, default=800, help="ZO-SOL training steps")
    ap.add_argument("--fo-steps", type=int, default=800, help="FO-SOL training steps")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam lr of ZO-SOL and FO-SOL (cosine decay)")
    ap.add_argument("--zo-lr", type=float, default=None, help="ZO-SOL's lr (None: --lr)")
    ap.add_argument("--init", choices=("non", "scratch"), default="non",
                    help="ZO-SOL and FO-SOL start from the NON corrector or from scratch")
    ap.add_argument("--sparsity", type=float, default=0.95,
                    help="fraction of the corrector's conv weights ZO-SOL leaves out each step")
    ap.add_argument("--sparsity-method", choices=("uniform", "zo_grasp"), default="uniform",
                    help="layer densities: the same for both convs, or from ZO-GraSP scores")
    ap.add_argument("--mu", type=float, default=1e-3, help="finite-difference step of ZO-SOL (and ZO-GraSP)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the correctors' training (weights, batches, windows, masks); "
                         "the simulations are fixed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids stalls on a shared CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="60-step simulations, n = 8, 20 NON epochs, 150 ZO/FO steps "
                         "(25 s to 2 min here, depending on load)")
    ap.add_argument("--out", default="results/zo_sol", help="folder for zo_sol.{md,csv,json,png}")
    return ap


if __name__ == "__main__":  # --help and flag errors answer before the slow torch import
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import deepzero_kernels as dz  # noqa: E402

TRAIN_RE = (97.7, 195.3, 390.6, 781.3, 1562.5, 3125.0)
TEST_RE = (146.5, 293.0, 585.9, 1171.9, 2343.8)
L_BOX = 2 * math.pi


# ---------------------------------------------------------------------------------------------
# The solver. State: (..., 2, N, N) float64; channel 0 = u on x-faces (i dx, (j+1/2) dx),
# channel 1 = v on y-faces ((i+1/2) dx, j dx); index [j, i] = [y, x]; periodic.
# ---------------------------------------------------------------------------------------------
class Solver:
    """One step = semi-Lagrangian advection -> implicit diffusion -> pressure projection.

    The NumPy path is the black box; ``step_torch`` is its differentiable twin (same operations
    in torch), used only by FO-SOL and the tests."""

    def __init__(self, n: int, dt: float, substeps: int = 1):
        self.n, self.dt, self.substeps = n, dt, substeps
        self.dx = L_BOX / n
        k = np.fft.fftfreq(n) * n
        kr = np.fft.rfftfreq(n) * n
        th_y, th_x = 2 * np.pi * k[:, None] / n, 2 * np.pi * kr[None, :] / n
        self.ax = (np.exp(1j * th_x) - 1) / self.dx   # forward difference (face -> centre)
        self.ay = (np.exp(1j * th_y) - 1) / self.dx
        self.lap = -(4 * np.sin(th_x / 2) ** 2 + 4 * np.sin(th_y / 2) ** 2) / self.dx ** 2
        self.inv_lap = np.where(self.lap == 0, 0.0, 1.0 / np.where(self.lap == 0, 1.0, self.lap))
        j, i = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")
        self.ii, self.jj = i, j
        self._t = {}

    # ---- NumPy (black box) ----
    @staticmethod
    def _interp(f, fi, fj):
        """Bilinear periodic interpolation of f (B, N, N) at fractional indices (B, N, N)."""
        b, n, _ = f.shape
        i0, j0 = np.floor(fi), np.floor(fj)
        wx, wy = fi - i0, fj - j0
        i0, j0 = i0.astype(np.intp) % n, j0.astype(np.intp) % n
        i1, j1 = (i0 + 1) % n, (j0 + 1) % n
        flat = f.ravel()
        r0 = j0 * n + (np.arange(b) * (n * n))[:, None, None]   # flat row offsets
        r1 = r0 + (j1 - j0) * n
        a, c = flat.take(r0 + i0), flat.take(r1 + i0)
        a = a + wx * (flat.take(r0 + i1) - a)
        c = c + wx * (flat.take(r1 + i1) - c)
        return a + wy * (c - a)

    def advect(self, s, dt):
        """First-order semi-Lagrangian: trace each face back by dt, interpolate there."""
        u, v = s[:, 0], s[:, 1]
        # velocity at u-points (v averaged from its 4 neighbours) and at v-points
        vs = v + np.roll(v, 1, 2)
        us = u + np.roll(u, -1, 2)
        v_at_u = 0.25 * (vs + np.roll(vs, -1, 1))
        u_at_v = 0.25 * (us + np.roll(us, 1, 1))
        c = dt / self.dx
        un = self._interp(u, self.ii - c * u, self.jj - c * v_at_u)
        vn = self._interp(v, self.ii - c * u_at_v, self.jj - c * v)
        return np.stack([un, vn], 1)

    def diffuse_project(self, s, nu, dt):
        """Implicit diffusion (I - nu dt Lap)^-1, then subtract grad p with Lap p = div u:
        exact in the discrete sense, so the discrete divergence is zero to rounding."""
        den = 1 - np.asarray(nu, dtype=np.float64).reshape(-1, 1, 1) * dt * self.lap
        uh, vh = np.fft.rfft2(s[:, 0]) / den, np.fft.rfft2(s[:, 1]) / den
        ph = (self.ax * uh + self.ay * vh) * self.inv_lap
        uh = uh + np.conj(self.ax) * ph   # grad = backward difference = -conj(forward)
        vh = vh + np.conj(self.ay) * ph
        return np.stack([np.fft.irfft2(uh, s=(self.n, self.n)), np.fft.irfft2(vh, s=(self.n, self.n))], 1)

    def step(self, s, nu):
        """Advance states s (B, 2, N, N) with viscosities nu (B,) by dt."""
        dt = self.dt / self.substeps
        for _ in range(self.substeps):
            s = self.diffuse_project(self.advect(s, dt), nu, dt)
        return s

    def divergence(self, s):
        return ((np.roll(s[:, 0], -1, 2) - s[:, 0]) + (np.roll(s[:, 1], -1, 1) - s[:, 1])) / self.dx

    # ---- torch twin (differentiable) ----
    def _tt(self, device, dtype):
        key = (device, dtype)
        if key not in self._t:
            cd = torch.complex128 if dtype == torch.float64 else torch.complex64
            arrays = {k: getattr(self, k) for k in ("ax", "ay", "lap", "inv_lap", "ii", "jj")}
            self._t[key] = {k: torch.as_tensor(a, device=device).to(cd if np.iscomplexobj(a) else dtype)
                            for k, a in arrays.items()}
        return self._t[key]

    @staticmethod
    def _interp_t(f, fi, fj):
        b, n, _ = f.shape
        i0, j0 = torch.floor(fi), torch.floor(fj)
        wx, wy = fi - i0, fj - j0
        i0, j0 = i0.long() % n, j0.long() % n
        i1, j1 = (i0 + 1) % n, (j0 + 1) % n
        flat = f.reshape(-1)
        r0 = j0 * n + (torch.arange(b, device=f.device) * (n * n))[:, None, None]
        r1 = r0 + (j1 - j0) * n
        a, c = flat[r0 + i0], flat[r1 + i0]
        a = a + wx * (flat[r0 + i1] - a)
        c = c + wx * (flat[r1 + i1] - c)
        return a + wy * (c - a)

    def step_torch(self, s, nu):
        """The same step in torch (autograd through advection weights, FFTs and projection)."""
        t = self._tt(s.device, s.dtype)
        nu = torch.as_tensor(nu, dtype=s.dtype, device=s.device).reshape(-1, 1, 1)
        dt = self.dt / self.substeps
        c = dt / self.dx
        for _ in range(self.substeps):
            u, v = s[:, 0], s[:, 1]
            vs, us = v + v.roll(1, 2), u + u.roll(-1, 2)
            v_at_u, u_at_v = 0.25 * (vs + vs.roll(-1, 1)), 0.25 * (us + us.roll(1, 1))
            u = self._interp_t(u, t["ii"] - c * u, t["jj"] - c * v_at_u)
            v = self._interp_t(v, t["ii"] - c * u_at_v, t["jj"] - c * v)
            den = 1 - nu * dt * t["lap"]
            uh, vh = torch.fft.rfft2(u) / den, torch.fft.rfft2(v) / den
            ph = (t["ax"] * uh + t["ay"] * vh) * t["inv_lap"]
            uh, vh = uh + t["ax"].conj() * ph, vh + t["ay"].conj() * ph
            s = torch.stack([torch.fft.irfft2(uh, s=(self.n, self.n)), torch.fft.irfft2(vh, s=(self.n, self.n))], 1)
        return s


def initial_state(n: int, seed: int, k0: float = 3.0) -> np.ndarray:
    """Random decaying-turbulence initial velocity (1, 2, n, n): random-phase streamfunction
    peaked at wavenumber ~k0, rms velocity 1, exactly divergence-free on the MAC grid (u, v are
    differences of the nodal streamfunction)."""
    rng = np.random.default_rng(seed)
    m = 64   # Fourier modes |k| < 32, the same for every n, so every resolution gets the same flow
    k = np.fft.fftfreq(m) * m
    kk = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    psi_h = kk * np.exp(-(kk / k0) ** 2) * np.exp(2j * np.pi * rng.random((m, m)))
    x = np.arange(n) * L_BOX / n
    ey = np.exp(1j * np.outer(x, k))          # (n, m)
    psi = np.real(ey @ psi_h @ ey.T)          # psi[j, i] at the node (x_i, y_j)
    dx = L_BOX / n
    u = (np.roll(psi, -1, 0) - psi) / dx      # u = dpsi/dy on x-faces
    v = -(np.roll(psi, -1, 1) - psi) / dx     # v = -dpsi/dx on y-faces
    s = np.stack([u, v])[None]
    return s / np.sqrt(np.mean(s ** 2))


def downsample(s: np.ndarray, f: int) -> np.ndarray:
    """Fine MAC state (..., 2, n, n) -> coarse (..., 2, n/f, n/f): each coarse face gets the mean
    of the fine faces it covers (the flux), so a divergence-free field stays divergence-free."""
    u, v = s[..., 0, :, ::f], s[..., 1, ::f, :]
    u = u.reshape(u.shape[:-2] + (u.shape[-2] // f, f, u.shape[-1])).mean(-2)
    v = v.reshape(v.shape[:-1] + (v.shape[-1] // f, f)).mean(-1)
    return np.stack([u, v], -3)


# ---------------------------------------------------------------------------------------------
# Data: high-resolution simulations downsampled to the coarse grid (the ground truth y_t).
# ---------------------------------------------------------------------------------------------
def simulate_reference(n: int, factor: int, dt: float, steps: int, res, seeds, substeps: int = 4, k0: float = 3.0):
    """(S, steps + 1, 2, n, n) downsampled fine trajectories; the fine solver (n * factor cells)
    takes ``substeps`` steps per coarse dt."""
    fine = Solver(n * factor, dt, substeps)
    s = np.concatenate([initial_state(n * factor, sd, k0) for sd in seeds])
    nu = np.array([L_BOX / r for r in res])
    out = [downsample(s, factor)]
    for _ in range(steps):
        s = fine.step(s, nu)
        out.append(downsample(s, factor))
    return np.stack(out, 1)


def re_feature(re) -> np.ndarray:
    """Reynolds number as a CNN input channel, roughly in [-1, 1] over the paper's range."""
    return np.log(np.asarray(re, dtype=np.float64) / 550.0) / 2.0


class Corrector(nn.Module):
    """App. H's corrective CNN: two 5x5 convolutions (periodic padding), input (u, v, Re),
    output the velocity correction. The last layer starts small so C starts near zero."""

    def __init__(self, width: int = 8, kernel: int = 5):
        super().__init__()
        p = kernel // 2
        self.conv1 = nn.Conv2d(3, width, kernel, padding=p, padding_mode="circular")
        self.conv2 = nn.Conv2d(width, 2, kernel, padding=p, padding_mode="circular")
        with torch.no_grad():
            self.conv2.weight.mul_(0.1)
            self.conv2.bias.zero_()

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def net_input(q, feat):
    """CNN input (B, 3, n, n) float32 from solver states q (B, 2, n, n) and Re features (B,)."""
    q = torch.as_tensor(q)
    f = torch.as_tensor(feat, dtype=q.dtype).reshape(-1, 1, 1, 1).expand(-1, 1, *q.shape[2:])
    return torch.cat([q, f], 1).float()


@torch.no_grad()
def correct(model, q, feat) -> np.ndarray:
    """C(q) as float64 NumPy (None model = SRC: no correction)."""
    if model is None:
        return np.zeros_like(q)
    return model(net_input(q, feat)).double().numpy()


def rollout_errors(solver, model, y, nu, feat) -> np.ndarray:
    """Run the (corrected) coarse solver from y[:, 0] for all steps; (S, steps) mean absolute
    error against y[:, 1:]."""
    s, errs = y[:, 0], []
    for t in range(y.shape[1] - 1):
        q = solver.step(s, nu)
        s = q + correct(model, q, feat)
        errs.append(np.abs(s - y[:, t + 1]).mean((1, 2, 3)))
    return np.stack(errs, 1)


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------
class Windows:
    """Training windows (sim, t0) of the (A3) loss: start at y[sim, t0], unroll n steps."""

    def __init__(self, y, nu, feat, n_unroll, rng):
        self.y, self.nu, self.feat, self.n, self.rng = y, nu, feat, n_unroll, rng

    def sample(self, w):
        sims = self.rng.integers(0, self.y.shape[0], w)
        t0 = self.rng.integers(0, self.y.shape[1] - self.n, w)
        refs = np.stack([self.y[s, t + 1:t + 1 + self.n] for s, t in zip(sims, t0)])  # (w, n, 2, N, N)
        return self.y[sims, t0], refs, self.nu[sims], self.feat[sims]


def sol_loss_numpy(solver, model, s0, refs, nu, feat):
    """(A3) per window and step, (w, n): MSE of the corrected unroll against the reference."""
    s, losses = s0, []
    for i in range(refs.shape[1]):
        q = solver.step(s, nu)
        s = q + correct(model, q, feat)
        losses.append(((s - refs[:, i]) ** 2).mean((1, 2, 3)))
    return np.stack(losses, 1)


def train_non(model, solver, y, nu, feat, *, epochs, lr, batch=64, seed=0, log=print):
    """NON: one-step supervised pairs (P(y_t) -> y_{t+1} - P(y_t)) from the training
    simulations, generated once, out of the loop; backprop through the CNN only."""
    S, T1 = y.shape[:2]
    q = solver.step(y[:, :-1].reshape((-1,) + y.shape[2:]), np.repeat(nu, T1 - 1))
    x = net_input(q, np.repeat(feat, T1 - 1))
    target = torch.as_tensor(y[:, 1:].reshape(q.shape) - q).float()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        tot = 0.0
        for lo in range(0, len(perm), batch):
            idx = perm[lo:lo + batch]
            loss = F.mse_loss(model(x[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        sched.step()
        if (ep + 1) % max(1, epochs // 5) == 0 or ep == epochs - 1:
            log(f"  NON epoch {ep + 1}/{epochs}: one-step MSE {tot / x.shape[0]:.3e}")
    return model


def train_fo_sol(model, solver, windows, *, steps, lr, n_windows, log=print, log_every=50):
    """FO-SOL: loss (A3) with backprop through the torch twin of the solver; Adam, cosine lr."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    hist = []
    for it in range(steps):
        s0, refs, nu, feat = windows.sample(n_windows)
        s = torch.as_tensor(s0)
        loss = 0.0
        for i in range(refs.shape[1]):
            q = solver.step_torch(s, nu)
            s = q + model(net_input(q, feat)).double()
            loss = loss + ((s - torch.as_tensor(refs[:, i])) ** 2).mean()
        loss = loss / refs.shape[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist.append(loss.item())
        if (it + 1) % log_every == 0 or it == steps - 1:
            log(f"  FO-SOL step {it + 1}/{steps}: unrolled loss {np.mean(hist[-log_every:]):.3e}")
    return model, hist


class SolTail:
    """The black-box tail for ``CGE(model, loss_fn=tail)``: per-sample losses of (A3) for
    corrections proposed by a perturbed CNN, computed by querying the NumPy solver only.

    The CGE batch is the n inputs ``x_i = P(s_i)`` of each window's unperturbed unroll
    (sample ``w * n + i``); a perturbed model returns corrections ``C'(x_i)`` for all of them at
    once. A perturbation theta' changes every step of the unroll, and later states move with it,
    so the tail re-runs the unroll and applies at step i

        C_theta(q_i') + (C'(x_i) - C_theta(x_i)),

    i.e. the current corrector at the state actually reached plus the perturbation's change of
    the correction. This equals the true perturbed unroll up to O(mu^2), the order of the finite
    difference's own error, so CGE estimates the gradient of (A3) through all n steps (checked
    against the torch twin's backprop in the tests). Sample ``w * n + i`` gets the step-i loss of
    window w, so the engine's mean over samples is (A3)'s mean.
    """

    def __init__(self, solver, model):
        self.solver = solver
        self.model = copy.deepcopy(model).eval()   # C_theta, frozen during one estimate
        self.queries = 0          # solver steps on one state, the black-box cost

    def prepare(self, s0, refs, nu, feat):
        """Unperturbed unroll; returns the CGE batch (x, targets)."""
        self.s0, self.refs, self.nu, self.feat = s0, refs, nu, feat
        w, n = refs.shape[:2]
        s, xs = s0, []
        for i in range(n):
            q = self.solver.step(s, nu)
            xs.append(net_input(q, feat))
            s = q + correct(self.model, q, feat)
        x = torch.stack(xs, 1).reshape((w * n,) + xs[0].shape[1:])
        with torch.no_grad():
            self.base_out = self.model(x).double().reshape((w, n) + refs.shape[2:]).numpy()
        self.queries += w * n
        return x, torch.arange(w * n)

    def __call__(self, outputs, targets):
        w, n = self.refs.shape[:2]
        k = outputs.shape[0] // (w * n)
        # the engine repeats the batch perturbation-major; check rather than assume
        if not torch.equal(targets.reshape(k, w * n), torch.arange(w * n).expand(k, -1)):
            raise ValueError("unexpected target order from the engine")
        dc = outputs.double().numpy().reshape((k, w, n) + self.refs.shape[2:]) - self.base_out[None]
        dc = dc.reshape((k * w, n) + self.refs.shape[2:])
        rep = lambda a: np.tile(a, (k,) + (1,) * (a.ndim - 1))  # noqa: E731
        s, nu, feat, refs = rep(self.s0), rep(self.nu), rep(self.feat), rep(self.refs)
        losses = np.empty((k * w, n))
        for i in range(n):
            q = self.solver.step(s, nu)
            s = q + correct(self.model, q, feat) + dc[:, i]
            losses[:, i] = ((s - refs[:, i]) ** 2).mean((1, 2, 3))
        self.queries += k * w * n
        return torch.from_numpy(losses.reshape(-1))


def train_zo_sol(model, solver, windows, *, steps, lr, n_windows, sparsity, sparsity_method="zo_grasp",
                 mu=1e-3, grasp_q=64, mask_interval=1, chunk_size=32, seed=0, log=print, log_every=20):
    """ZO-SOL: DeepZero on (A3) -- layer densities from ZO-GraSP (or uniform), random masks
    obeying them redrawn every ``mask_interval`` steps, sparse CGE through the black-box tail,
    Adam with cosine lr (as FO-SOL). Biases are estimated densely, as in DeepZero."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    tail = SolTail(solver, model)
    densities = None
    if sparsity > 0 and sparsity_method == "zo_grasp":
        x, tg = tail.prepare(*windows.sample(n_windows))
        scores = dz.zo_grasp_scores(model, x, tg, q=grasp_q, mu=mu, loss_fn=tail, generator=g)
        densities = dz.layer_densities(dz.prune_masks(scores, sparsity))
    elif sparsity > 0:
        densities = {n: 1.0 - sparsity for n in ("conv1.weight", "conv2.weight")}
    if densities:
        log(f"  {sparsity_method} layer densities: " + ", ".join(f"{k} {v:.3f}" for k, v in densities.items()))
    cge = dz.CGE(model, loss_fn=tail, mu=mu, chunk_size=chunk_size)
    hist, queries0, masks = [], tail.queries, None
    for it in range(steps):
        if densities is not None and it % mask_interval == 0:
            masks = dz.random_masks(model, densities, generator=g)
        tail.model.load_state_dict(model.state_dict())
        x, tg = tail.prepare(*windows.sample(n_windows))
        n0 = cge.num_perturbations
        opt.zero_grad()
        cge.backward(x, tg, masks)
        opt.step()
        sched.step()
        hist.append(cge.last_loss)
        if (it + 1) % log_every == 0 or it == steps - 1:
            log(f"  ZO-SOL step {it + 1}/{steps}: unrolled loss {np.mean(hist[-log_every:]):.3e}, "
                f"{cge.num_perturbations - n0} coordinates/step, solver queries so far {tail.queries - queries0:,}")
    return model, hist, tail.queries - queries0


# ---------------------------------------------------------------------------------------------
# Experiment.
# ---------------------------------------------------------------------------------------------
def a3_loss(solver, model, y, nu, feat, n_unroll, stride=12):
    """(A3) on a fixed set of windows (every sim, t0 = 0, stride, ...): the training objective."""
    t0s = list(range(0, y.shape[1] - n_unroll, stride))
    s0 = np.concatenate([y[:, t] for t in t0s])
    refs = np.concatenate([y[:, t + 1:t + 1 + n_unroll] for t in t0s])
    return float(sol_loss_numpy(solver, model, s0, refs, np.tile(nu, len(t0s)), np.tile(feat, len(t0s))).mean())


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.unroll, args.non_epochs, args.zo_steps, args.fo_steps = 60, 8, 20, 150, 150
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    log(f"reference simulations: {args.factor * args.grid}^2 -> {args.grid}^2, {args.steps} steps, "
        f"train Re {TRAIN_RE}, test Re {TEST_RE}")
    # every Re gets --sims-per-re random initial conditions; train seeds 0.., test seeds 1000..
    re_tr, re_te = np.repeat(TRAIN_RE, args.sims_per_re), np.repeat(TEST_RE, args.sims_per_re)
    y_tr = simulate_reference(args.grid, args.factor, args.dt, args.steps, re_tr, range(len(re_tr)), k0=args.k0)
    y_te = simulate_reference(args.grid, args.factor, args.dt, args.steps, re_te,
                              range(1000, 1000 + len(re_te)), k0=args.k0)
    nu_tr, nu_te = L_BOX / re_tr, L_BOX / re_te
    f_tr, f_te = re_feature(re_tr), re_feature(re_te)
    solver = Solver(args.grid, args.dt)
    results = {}

    def record(name, model, seconds, extra=None):
        err = rollout_errors(solver, model, y_te, nu_te, f_te)   # (sims, T)
        per_sim = err.mean(1)
        results[name] = dict(mae=float(per_sim.mean()), mae_std=float(per_sim.std()),
                             mae_per_test_re={str(r): float(per_sim[re_te == r].mean()) for r in TEST_RE},
                             mae_vs_step=err.mean(0).tolist(),
                             train_a3=a3_loss(solver, model, y_tr, nu_tr, f_tr, args.unroll),
                             train_seconds=round(seconds, 1), **(extra or {}))
        log(f"{name}: test MAE {per_sim.mean():.4f} (per Re "
            f"{[round(v, 3) for v in results[name]['mae_per_test_re'].values()]}), "
            f"train (A3) loss {results[name]['train_a3']:.3e}")

    record("SRC", None, 0.0)
    t0 = time.perf_counter()
    non = train_non(Corrector(args.width), solver, y_tr, nu_tr, f_tr, epochs=args.non_epochs, lr=args.non_lr,
                    seed=args.seed, log=log)
    record("NON", non, time.perf_counter() - t0, dict(gradient="backprop, one-step pairs"))

    def start():
        torch.manual_seed(args.seed + 1)
        m = Corrector(args.width)
        if args.init == "non":
            m.load_state_dict(non.state_dict())
        return m

    log(f"ZO-SOL: sparse CGE ({args.sparsity:.0%}, {args.sparsity_method}), n = {args.unroll}, "
        f"{args.windows} windows/step, {args.zo_steps} steps, lr {args.zo_lr or args.lr}")
    windows = lambda: Windows(y_tr, nu_tr, f_tr, args.unroll, np.random.default_rng(args.seed))  # noqa: E731
    t0 = time.perf_counter()
    zo, zo_hist, queries = train_zo_sol(start(), solver, windows(), steps=args.zo_steps, lr=args.zo_lr or args.lr,
                                        n_windows=args.windows, sparsity=args.sparsity,
                                        sparsity_method=args.sparsity_method, mu=args.mu, seed=args.seed, log=log,
                                        log_every=max(1, args.zo_steps // 10))
    record("ZO-SOL", zo, time.perf_counter() - t0,
           dict(gradient=f"sparse CGE through the NumPy solver (black box), {queries:,} solver state-steps",
                solver_queries=queries, loss_history=zo_hist))

    log(f"FO-SOL: backprop through the torch twin, same windows, {args.fo_steps} steps")
    t0 = time.perf_counter()
    fo, fo_hist = train_fo_sol(start(), solver, windows(), steps=args.fo_steps, lr=args.lr, n_windows=args.windows,
                               log=log, log_every=max(1, args.fo_steps // 5))
    record("FO-SOL", fo, time.perf_counter() - t0, dict(gradient="backprop through the differentiable twin",
                                                         loss_history=fo_hist))
    write_outputs(args, results, time.perf_counter() - t_start)
    log(f"done; wrote {args.out}/zo_sol.{{md,csv,json,png}}")
    return results


def write_outputs(args, results, seconds):
    names = list(results)
    head = ["method", "test MAE", "std over test sims"] + [f"Re {r}" for r in TEST_RE] + ["train (A3) loss", "train s"]
    rows = [[n, f"{r['mae']:.4f}", f"{r['mae_std']:.4f}"] + [f"{v:.3f}" for v in r["mae_per_test_re"].values()]
            + [f"{r['train_a3']:.3e}", f"{r['train_seconds']:.0f}"] for n, r in results.items()]
    with open(os.path.join(args.out, "zo_sol.csv"), "w", newline="") as f:
        csv.writer(f).writerows([head] + rows)
    with open(os.path.join(args.out, "zo_sol.md"), "w") as f:
        f.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        f.writelines("| " + " | ".join(r) + " |\n" for r in rows)
    with open(os.path.join(args.out, "zo_sol.json"), "w") as f:
        json.dump(dict(config=vars(args), train_re=TRAIN_RE, test_re=TEST_RE, seconds=round(seconds, 1),
                       results=results), f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        a1.plot(np.arange(1, args.steps + 1), results[n]["mae_vs_step"], label=n)
    a1.set(xlabel="time step", ylabel="MAE vs high-res (mean over test sims)", title="error vs time step")
    a1.legend()
    a2.bar(names, [results[n]["mae"] for n in names], yerr=[results[n]["mae_std"] for n in names],
           color=["C0", "C1", "C2", "C3"][:len(names)])
    for i, n in enumerate(names):
        a2.text(i, results[n]["mae"], f"{results[n]['mae']:.3f}", ha="center", va="bottom")
    a2.set(ylabel="mean absolute error", title="average MAE over test sims (bar: std)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "zo_sol.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
