"""Solver-in-the-loop experiment (python/experiments/zo_sol.py): the NumPy flow solver is a real
incompressible solver, its torch twin is the same function, and the ZO-SOL tail gives CGE the
gradient of loss (A3) through the black-box solver."""

import numpy as np
import pytest
import torch

import deepzero_kernels as dz

from conftest import load_script

pytestmark = pytest.mark.experiment

zs = load_script("python/experiments/zo_sol.py")


@pytest.fixture(scope="module")
def ref():
    """Two short high-res (32^2) simulations downsampled to 8^2."""
    res = (200.0, 2000.0)
    y = zs.simulate_reference(8, 4, 0.1, 12, res, (0, 1), k0=2.0)
    return y, np.array([zs.L_BOX / r for r in res]), zs.re_feature(res)


def test_projection_makes_velocity_divergence_free():
    sol = zs.Solver(16, 0.1)
    rng = np.random.default_rng(0)
    s = rng.standard_normal((3, 2, 16, 16))
    assert np.abs(sol.divergence(s)).max() > 1
    p = sol.diffuse_project(s, np.zeros(3), 0.1)
    assert np.abs(sol.divergence(p)).max() < 1e-12
    np.testing.assert_allclose(sol.diffuse_project(p, np.zeros(3), 0.1), p, atol=1e-12)  # a projection
    # a pure gradient field is removed entirely (up to its mean, which projection keeps)
    phi = rng.standard_normal((1, 16, 16))
    grad = np.stack([phi - np.roll(phi, 1, 2), phi - np.roll(phi, 1, 1)], 1) / sol.dx
    np.testing.assert_allclose(sol.diffuse_project(grad, np.zeros(1), 0.1), 0, atol=1e-12)
    # a whole step keeps the state divergence-free, and so does downsampling a fine state
    s = zs.downsample(zs.initial_state(64, 1), 4)
    assert np.abs(sol.divergence(s)).max() < 1e-12
    assert np.abs(sol.divergence(sol.step(s, np.array([0.01])))).max() < 1e-12


def test_diffusion_is_the_implicit_heat_step_and_viscosity_decays_energy():
    n, dt, nu = 16, 0.1, 0.05
    sol = zs.Solver(n, dt)
    # u = sin(2 y) on x-faces is divergence-free: one diffusion step damps it by 1/(1 - nu dt lam)
    y = (np.arange(n) + 0.5) * sol.dx
    s = np.zeros((1, 2, n, n))
    s[0, 0] = np.sin(2 * y)[:, None]
    lam = -4 * np.sin(2 * np.pi * 2 / n / 2) ** 2 / sol.dx ** 2
    np.testing.assert_allclose(sol.diffuse_project(s, np.array([nu]), dt), s / (1 - nu * dt * lam), atol=1e-12)
    # kinetic energy falls every step, and faster with more viscosity
    s0 = zs.downsample(zs.initial_state(64, 2), 4)
    energies = {}
    for visc in (1e-3, 5e-2):
        s, e = s0, [np.mean(s0 ** 2)]
        for _ in range(20):
            s = sol.step(s, np.array([visc]))
            e.append(np.mean(s ** 2))
        assert np.all(np.diff(e) < 0)
        energies[visc] = e[-1]
    assert energies[5e-2] < 0.8 * energies[1e-3]


def test_torch_twin_matches_numpy_solver():
    sol = zs.Solver(16, 0.1, substeps=2)
    s = np.concatenate([zs.downsample(zs.initial_state(64, k), 4) for k in range(3)]) * 2.5  # CFL > 1
    nu = np.array([0.001, 0.01, 0.05])
    a, b = s, torch.tensor(s)
    for _ in range(5):
        a, b = sol.step(a, nu), sol.step_torch(b, nu)
    assert b.dtype == torch.float64
    np.testing.assert_allclose(b.numpy(), a, rtol=0, atol=1e-10)


def test_tail_contract_and_cge_matches_backprop_through_the_twin(ref):
    y, nu, feat = ref
    sol = zs.Solver(8, 0.1)
    torch.manual_seed(0)
    model = zs.Corrector(width=4, kernel=3)
    with torch.no_grad():
        model.conv2.weight.mul_(10)   # a non-trivial correction
    win = zs.Windows(y, nu, feat, 4, np.random.default_rng(0))
    s0, refs, wnu, wfeat = win.sample(3)
    tail = zs.SolTail(sol, model)
    x, tg = tail.prepare(s0, refs, wnu, wfeat)
    assert x.shape == (12, 3, 8, 8) and tg.shape == (12,)
    # unperturbed: the tail's per-sample losses are (A3)'s per window and step
    base = tail(model(x).detach(), tg)
    np.testing.assert_allclose(base.numpy().reshape(3, 4), zs.sol_loss_numpy(sol, model, s0, refs, wnu, wfeat),
                               rtol=1e-5)
    # FO: backprop through the torch twin
    s, loss = torch.as_tensor(s0), 0.0
    for i in range(4):
        q = sol.step_torch(s, wnu)
        s = q + model(zs.net_input(q, wfeat)).double()
        loss = loss + ((s - torch.as_tensor(refs[:, i])) ** 2).mean()
    (loss / 4).backward()
    fo = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    q0 = tail.queries
    g = dz.CGE(model, loss_fn=tail, mu=1e-4, chunk_size=16).estimate(x, tg)
    zo = torch.cat([g[n].flatten() for n, _ in model.named_parameters()]).double()
    assert float((zo - fo).norm() / fo.norm()) < 0.05
    n_params = sum(p.numel() for p in model.parameters())
    # one n-step unroll per window for the base and for each coordinate (4 solver steps each)
    assert tail.queries - q0 == (n_params + 1) * 3 * 4


def test_zo_sol_training_decreases_the_unrolled_loss(ref):
    y, nu, feat = ref
    sol = zs.Solver(8, 0.1)
    torch.manual_seed(0)
    model = zs.Corrector(width=4, kernel=3)
    before = zs.a3_loss(sol, model, y, nu, feat, 4, stride=4)
    win = zs.Windows(y, nu, feat, 4, np.random.default_rng(0))
    model, hist, queries = zs.train_zo_sol(model, sol, win, steps=25, lr=3e-3, n_windows=4, sparsity=0.5,
                                           sparsity_method="zo_grasp", grasp_q=8, log=lambda *a: None)
    after = zs.a3_loss(sol, model, y, nu, feat, 4, stride=4)
    assert np.isfinite(hist).all() and queries > 0
    assert after < 0.8 * before
    src = zs.rollout_errors(sol, None, y, nu, feat).mean()
    assert np.isfinite(src) and zs.rollout_errors(sol, model, y, nu, feat).mean() < src
