"""Every floating-point tolerance of the suite, derived from the arithmetic being compared.

A float32 result carries round-off of about EPS32 times the magnitude of the values it was
computed from, so a tolerance is a number of ulps times a scale: ``f32_tol(scale, ulps)``.
The scale is the largest |value| compared (taken from the data in the test) unless a
comment names another; the ulps count is the depth of the arithmetic that may round
differently (one sequential rounding stage can move a result by about one ulp of its scale).
Measured deviations, per kernel and thread count: BENCHMARKS.md ("Parity in float32 ulps").
Comparisons that are exact by construction stay exact (``==``, ``torch.equal``, atol=0).

``DENS_ULPS_LOG=<file>`` makes ``assert_ulps`` append each comparison's deviation in ulps
(test, what, ulps) to that file, for benchmarks/parity_ulps.py and BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

EPS32 = 2.0**-23  # float32 machine epsilon (≈ 1.19e-7): 1 ulp of a value in [1, 2)
EPS64 = 2.0**-52  # float64 machine epsilon (≈ 2.2e-16)

# ---------------------------------------------------------------- model outputs (float32)

# Our models loading the original implementation's checkpoints vs its reference outputs
# (tests/data/original_dens): the same operations in the same order; only the CPU kernels
# differ (vectorised vs scalar exp/silu/sqrt, blocked matmul and reduction order). The tiny
# fixture models are ~64 sequential rounding stages deep (2 layers, each: edge rotation,
# two SO(2) linears, radial MLP, gate, softmax, neighbour sum, rotation back, layer norm,
# S2-grid FFN), ~1 ulp each. Measured ≤ 46 ulps (kernels `default`), ≤ 4 (AVX2/AVX512); one
# output-head weight scaled by 1 + 1e-4 moves the forces by ~190 ulps (the negative control).
ORIGINAL_PARITY_ULPS = 64

# The same math written in another order or another code base (ours vs fairchem's DeNS port
# or plain model, head blocks on some atoms vs every atom, train vs eval mode): each
# reordered sum or fused op may round differently, at the same ~64-stage depth as above.
REORDERED_ULPS = 64

# Gradients of such a pair: the backward pass runs the forward's depth once more, in
# reverse (twice the stages), and a parameter's gradient sums over every edge and atom.
GRADIENT_ULPS = 128

# Losses and metrics recomputed by hand from the same outputs: one float32 reduction over
# at most a few hundred elements (pairwise summation: ≤ log2(n) ≈ 8 ulps) after 1–2
# elementwise ops (|x|, sqrt, division), of the loss itself as scale.
LOSS_ULPS = 16
LOSS_REL = LOSS_ULPS * EPS32

# The original trainer's losses and metrics (trainer_reference.json) from our outputs: the
# outputs carry the ORIGINAL_PARITY_ULPS of the force scale; the loss's terms |F - target|
# are of the same order as the forces, so the loss inherits that relative error, plus one
# reduction (LOSS_ULPS).
TRAINER_REFERENCE_ULPS = ORIGINAL_PARITY_ULPS + LOSS_ULPS

# A handful of float32 elementwise ops on the same inputs, in another order (the force
# encoding's spherical harmonics vs their closed form: a norm, a division, a cubic).
ELEMENTWISE_ULPS = 8

# Two outputs that must differ (a DeNS mode, an encoding switch): by more than the
# round-off of two runs of the same math, REORDERED_ULPS of max |value|.
MUST_DIFFER_ULPS = REORDERED_ULPS

# ---------------------------------------------------------------- without the same RNG or graph

# Without RNG parity (another forward seed than the original's): EquiformerV2 draws a random
# roll angle for every edge frame and its S2 grid is equivariant only to its discretisation,
# so outputs move by ~1.5e-6 eV(/Å) (fixture README: 5.3e-7 in units of the force rmsd 2.89);
# bound 1e-5 eV and eV/Å on energies ≤ 0.8 eV and forces ≤ 0.14 eV/Å.
EQV2_OTHER_SEED_ATOL_EV = 1e-5
# eSCN samples its sphere points at random: other draws move the raw model's forces by up
# to 3.2e-4 (normalised units, |F| ≤ 0.59; fixture README, 5 seeds), its energies by 1e-7;
# predictions use the EMA weights, whose forces (≤ 9e-5 eV/Å) are a 1000-fold cancellation
# of per-sample values, so this bound checks the energies and only the size of the forces.
ESCN_OTHER_SEED_ATOL_EV = 2e-3
# One fixture structure alone vs inside the 4-structure batch of the reference: the
# max_neighbors cut breaks ties between equidistant lattice neighbours differently (forces
# move by 2e-2 eV/Å, the energy, a sum over 16 atoms, by much less): not round-off.
NEIGHBOUR_TIES_ENERGY_EV = 1e-4

# A run resumed after preemption vs the uninterrupted run, the first 3 losses after the
# resume: fairchem checkpoints do not hold torch's RNG, so EquiformerV2 draws other edge
# frames (S2-grid discretisation, see EQV2_OTHER_SEED_ATOL_EV) and a training step
# amplifies the difference (lr × gradient): not round-off; 2 % of the loss.
RESUMED_RUN_LOSS_REL = 0.02

# ---------------------------------------------------------------- equivariance

# EquiformerV2 / eSCN nonlinearities act on an S2 grid (and eSCN's heads integrate over a
# few random sphere samples): their outputs are equivariant only up to the grid's
# discretisation error, a property of the grid resolution, not of float32 (round-off is 1e4
# times smaller). Bounds on |R F - F(R x)| / |F| and |E - E(R x)| / max |E| (the energy comes
# from the same grids), the measured values beside each.
EQV2_ROTATION_REL = 1e-2  # measured ≤ 2e-3 (S2-grid activations, uncapped neighbour list)
ESCN_ROTATION_REL = 0.1  # ~5 %: 512 sampled sphere points of a tiny random model
# eSEN (gate activations, spectral MLPs) is exactly equivariant: only round-off of the
# rotated inputs (positions, cell and encoded forces each rounded once, ≤ 0.5 ulp) carried
# through REORDERED_ULPS of depth, relative to |F|.
ESEN_ROTATION_REL = 2 * REORDERED_ULPS * EPS32
# Conservative eSEN (forces = -dE/dx) clips its edge frames (rot_clip) in gradient mode:
# not round-off but the clipping; measured 9e-4.
ESEN_CONSERVATIVE_ROTATION_REL = 5e-3

# ---------------------------------------------------------------- data and units

# A float64 value stored as float32 and read back: one rounding to nearest, 0.5 ulp, plus
# one more for a unit conversion done in float32 on either side.
F32_STORAGE_ULPS = 2
F32_STORAGE_REL = F32_STORAGE_ULPS * EPS32

# Python floats (float64) through a few operations (a unit conversion each way, an epoch
# fraction, a schedule's interpolation): ~1 ulp each.
F64_ULPS = 4
F64_REL = F64_ULPS * EPS64

# Statistics of n ≤ ~2000 float64 labels computed by two codes (numpy vs the converter):
# pairwise sums round by ≤ log2(n) ≈ 11 ulps, and a std's subtraction of the mean amplifies
# that by |mean| / std (MD17 total energies: ~1e3 eV spread by ~1 eV): ~1e4 ulps of float64.
F64_STATISTICS_REL = 1e4 * EPS64

# fairchem fits normalizers in float32 (a reduction over ≤ a few thousand labels, ≤ log2 n ≈
# 12 ulps, then sqrt and a division); we recompute in float64: ~16 ulps of float32 relative,
# times 8 for the |mean| / std of a std or rms over labels of mixed sign.
FIT_STATISTICS_REL = 128 * EPS32

# A fresh GFN2-xTB single point vs the value stored by the MD run: equal to SCF convergence
# (the MD restarts each SCF from the previous frame's wavefunction), not to round-off: xTB's
# default energy convergence 1e-6 Eh = 3e-5 eV, gradients ~10x that per component.
XTB_SCF_ENERGY_EV = 1e-4
XTB_SCF_FORCES_EV_PER_A = 1e-3

# EMT labels (float64) of positions that are then stored as float32: recomputing EMT from
# the stored positions (rounded by ≤ 0.5 ulp of |x| ≤ 30 Å: 1.8e-6 Å) moves each force by
# stiffness × δx (EMT metals: ≤ 100 eV/Å², 1.8e-4 eV/Å) and the energy by Σ F·δx (random signs
# over ≤ 200 components of |F| ≤ 2 eV/Å: ~5e-5 eV).
EMT_ROUNDED_POSITIONS_FORCES_EV_PER_A = 1e-3
EMT_ROUNDED_POSITIONS_ENERGY_EV = 1e-4


def f32_tol(scale: float, ulps: float) -> float:
    """``ulps`` float32 ulps of a value of magnitude ``scale``."""
    return float(ulps) * EPS32 * float(scale)


def f64_tol(scale: float, ulps: float) -> float:
    """``ulps`` float64 ulps of a value of magnitude ``scale``."""
    return float(ulps) * EPS64 * float(scale)


@contextlib.contextmanager
def bias_gradient_scales(model: torch.nn.Module):
    """Yields {bias name: sum over rows of |dL/d output|} of every Linear, for a forward and
    backward run inside the block.

    A Linear's bias gradient sums its output's gradient over every row (atom, edge, sphere
    sample); where the rows cancel (eSCN's head: |sum| 1e-8 from terms of 1e-6, sphere
    samples weighted by unit vectors) the round-off scales with the terms, not the sum.
    """
    scales: dict[str, float] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:

            def record(module, grad_input, grad_output, name=f"{module_name}.bias"):
                terms = grad_output[0].abs().reshape(-1, grad_output[0].shape[-1]).sum(0).max()
                scales[name] = scales.get(name, 0.0) + float(terms)

            hooks.append(module.register_full_backward_hook(record))
    try:
        yield scales
    finally:
        for hook in hooks:
            hook.remove()


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
    return np.asarray(value, dtype=np.float64)


def assert_ulps(actual, expected, ulps: float, scale: float | None = None, what: str = "") -> float:
    """Asserts max |actual - expected| <= ulps float32 ulps of ``scale`` (default: max |expected|).

    Returns the deviation in ulps. A zero scale (all-zero expected values) asks for equality.
    """
    actual, expected = _numpy(actual), _numpy(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max(initial=0.0)) if scale is None else float(scale)
    difference = float(np.abs(actual - expected).max(initial=0.0))
    deviation = difference / (EPS32 * scale) if scale > 0 else (0.0 if difference == 0 else float("inf"))
    log = os.environ.get("DENS_ULPS_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" (")[0]
        with open(log, "a") as handle:
            handle.write(f"{test}\t{what}\t{deviation:.3f}\n")
    tolerance = f32_tol(scale, ulps)
    bad = int((np.abs(actual - expected) > tolerance).sum())
    assert deviation <= ulps, (
        f"{what}: max |difference| {difference:.3e} = {deviation:.1f} ulps of the scale "
        f"{scale:.3e} > {ulps} ulps ({tolerance:.3e}) at {bad} of {expected.size} elements"
    )
    return deviation
