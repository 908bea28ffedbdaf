"""Sampler families (``dps.samplers``): with the correction filter, a multistep sampler's x-update receives exactly
the first-order step of the rule's correction, ``W_i c_i``, whatever the correction did at earlier steps.

The samplers' update rules are written out below as k-diffusion's ``sampling.py`` states them (ComfyUI's copy,
comfy/k_diffusion/sampling.py @ a125cd84), independently of ``dps.samplers``. A last test runs ComfyUI's own
sampler functions when a ComfyUI checkout is given (``COMFYUI_PATH``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT
from dps.samplers import (CorrectionFilter, DPMSolver2M, DPMSolver2MSDE, DPMSolver3MSDE, SingleStep, base_sampler,
                          family_for, probe_family, sampler_family)


def lam(sigma: float, flow: bool) -> float:
    """Half-log-SNR as k-diffusion's ``sigma_to_half_log_snr``: −log σ, or logit⁻ for flow (CONST) models."""
    return math.log((1 - sigma) / sigma) if flow else -math.log(sigma)


def euler_step(x, sigmas, i, D, state, flow):
    return x + (sigmas[i + 1] - sigmas[i]) * (x - D[-1]) / sigmas[i], 1 - sigmas[i + 1] / sigmas[i]


def dpmpp_2m_step(x, sigmas, i, D, state, flow):
    t, t_next = -math.log(sigmas[i]), (-math.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else math.inf)
    h = t_next - t
    w = -math.expm1(-h)
    if len(D) == 1 or sigmas[i + 1] == 0:
        return (sigmas[i + 1] / sigmas[i]) * x + w * D[-1], w
    r = (t + math.log(sigmas[i - 1])) / h
    d = (1 + 1 / (2 * r)) * D[-1] - (1 / (2 * r)) * D[-2]
    return (sigmas[i + 1] / sigmas[i]) * x + w * d, w


def sde_first_order(x, sigmas, i, D, flow, eta):
    """The first-order part both SDE samplers share (noise left out: it cancels in the comparisons)."""
    ls, lt = lam(sigmas[i], flow), lam(sigmas[i + 1], flow)
    h = lt - ls
    h_eta = h * (eta + 1)
    alpha_t = sigmas[i + 1] * math.exp(lt)
    w = alpha_t * -math.expm1(-h_eta)
    return sigmas[i + 1] / sigmas[i] * math.exp(-h * eta) * x + w * D[-1], w, h, h_eta, alpha_t


def dpmpp_2m_sde_step(x, sigmas, i, D, state, flow, eta=1.0, solver="midpoint"):
    if sigmas[i + 1] == 0:
        return D[-1], 1.0
    x, w, h, h_eta, alpha_t = sde_first_order(x, sigmas, i, D, flow, eta)
    if len(D) > 1:
        r = state["h_last"] / h
        if solver == "heun":
            x = x + alpha_t * (-math.expm1(-h_eta) / -h_eta + 1) * (1 / r) * (D[-1] - D[-2])
        else:
            x = x + 0.5 * alpha_t * -math.expm1(-h_eta) * (1 / r) * (D[-1] - D[-2])
    state["h_last"] = h
    return x, w


def dpmpp_3m_sde_step(x, sigmas, i, D, state, flow, eta=1.0):
    if sigmas[i + 1] == 0:
        return D[-1], 1.0
    x, w, h, h_eta, alpha_t = sde_first_order(x, sigmas, i, D, flow, eta)
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    if len(D) > 2:
        r0, r1 = state["h_1"] / h, state["h_2"] / h
        d1_0 = (D[-1] - D[-2]) / r0
        d1_1 = (D[-2] - D[-3]) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
    elif len(D) > 1:
        r = state["h_1"] / h
        x = x + (alpha_t * phi_2) * (D[-1] - D[-2]) / r
    state["h_2"], state["h_1"] = state.get("h_1"), h
    return x, w


CASES = {
    "euler": (euler_step, SingleStep()),
    "dpmpp_2m": (dpmpp_2m_step, DPMSolver2M()),
    "dpmpp_2m_sde": (dpmpp_2m_sde_step, DPMSolver2MSDE()),
    "dpmpp_2m_sde_heun": (lambda *a: dpmpp_2m_sde_step(*a, solver="heun"), DPMSolver2MSDE(solver="heun")),
    "dpmpp_2m_sde_eta0.5": (lambda *a: dpmpp_2m_sde_step(*a, eta=0.5), DPMSolver2MSDE(eta=0.5)),
    "dpmpp_3m_sde": (dpmpp_3m_sde_step, DPMSolver3MSDE()),
}


def run(step, sigmas, denoise, corrections, filt, flow):
    """The sampler loop; returns per step the state x_i, the raw and the fed predictions and W_i."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    state, fed, raw, rows = {}, [], [], []
    for i in range(len(sigmas) - 1):
        d = denoise(x, sigmas[i])
        c = corrections[i] if filt is None else filt(sigmas[i], corrections[i])
        raw.append(d)
        fed.append(d + c)
        snapshot = dict(state)
        x_next, w = step(x, sigmas, i, fed, state, flow)
        rows.append((x, list(raw), list(fed), snapshot, w))
        x = x_next
    return rows


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_update_receives_the_first_order_step_of_the_correction(name, flow):
    step, family = CASES[name]
    if flow:
        sigmas = [0.98, 0.9, 0.75, 0.55, 0.35, 0.2, 0.1, 0.04, 0.0]
        alpha = lambda s: 1 - s  # noqa: E731
    else:
        sigmas = [14.6, 8.0, 4.5, 2.4, 1.2, 0.6, 0.3, 0.1, 0.0]
        alpha = lambda s: 1.0  # noqa: E731
    denoise = lambda x, s: 0.25 / (0.25 + s**2) * x  # noqa: E731  (the Gaussian prior's denoiser, linear)
    g = torch.Generator().manual_seed(2)
    corrections = [torch.randn(2, 3, 4, 4, generator=g) for _ in sigmas[:-1]]
    rows = run(step, sigmas, denoise, corrections, CorrectionFilter(family, sigmas, alpha), flow)
    for i, (x, raw, fed, state, w) in enumerate(rows):
        guided, _ = step(x, sigmas, i, fed, dict(state), flow)
        plain, _ = step(x, sigmas, i, raw, dict(state), flow)
        torch.testing.assert_close(guided - plain, w * corrections[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_a_step_that_extrapolates_far_is_taken_at_first_order(name):
    """Given the predictions, a step whose gain Σ|b| exceeds the bound (here the step to σ = 0.05, as the step to σ_min
    on SD's normal schedule) is the first-order step from D_i + c_i, prior included; every other step keeps the prior's higher
    order and receives W_i c_i."""
    step, family = CASES[name]
    sigmas = [14.6, 10.0, 7.0, 5.0, 3.5, 2.5, 1.8, 1.3, 0.05, 0.0]
    big = 7
    gains = [sum(abs(b) for b in family.weights(sigmas, i)) for i in range(len(sigmas) - 1)]
    assert gains[big] > 4.0 and all(g <= 4.0 for i, g in enumerate(gains) if i != big)
    denoise = lambda x, s: torch.tanh(0.25 / (0.25 + s**2) * x)  # noqa: E731  (nonlinear in x)
    g = torch.Generator().manual_seed(3)
    corrections = [torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in sigmas[:-1]]
    filt = CorrectionFilter(family, sigmas, max_gain=4.0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    state, fed, raw = {}, [], []
    for i in range(len(sigmas) - 1):
        d = denoise(x, sigmas[i])
        raw.append(d)
        fed.append(d + filt(sigmas[i], corrections[i], d))
        x_next, w = step(x, sigmas, i, fed, dict(state), False)
        if i == big:
            first_order, _ = step(x, sigmas, i, [d + corrections[i]], {}, False)
            torch.testing.assert_close(x_next, first_order, rtol=1e-9, atol=1e-9)
        else:
            plain, _ = step(x, sigmas, i, raw, dict(state), False)
            torch.testing.assert_close(x_next - plain, w * corrections[i], rtol=1e-9, atol=1e-9)
        step(x, sigmas, i, fed, state, False)        # advance the step sizes it remembers
        x = x_next
    assert filt.first_order == [big]


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_without_the_filter_the_extrapolation_amplifies_the_correction(name):
    """The control: fed unchanged, the multistep update's guidance part is not the intended step."""
    step, _ = CASES[name]
    sigmas = [14.6, 8.0, 4.5, 2.4, 1.2, 0.6, 0.3, 0.1, 0.0]
    g = torch.Generator().manual_seed(2)
    corrections = [torch.randn(2, 3, 4, 4, generator=g) for _ in sigmas[:-1]]
    rows = run(step, sigmas, lambda x, s: 0.0 * x, corrections, None, False)
    x, raw, fed, state, w = rows[3]
    guided, _ = step(x, sigmas, 3, fed, dict(state), False)
    plain, _ = step(x, sigmas, 3, raw, dict(state), False)
    error = (guided - plain - w * corrections[3]).norm() / (w * corrections[3]).norm()
    assert error > 0.2


def test_2m_filter_is_the_convex_recursion_of_the_issue():
    """c'_i = (c_i + k c'_{i−1})/(1 + k) with k = 1/(2r), r = h_{i−1}/h_i (issue 11)."""
    sigmas = [10.0, 5.0, 2.0, 0.0]
    filt = CorrectionFilter(DPMSolver2M(), sigmas)
    c0, c1 = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3.0)
    assert torch.equal(filt(10.0, c0), c0)
    k = 1 / (2 * math.log(10 / 5) / math.log(5 / 2))
    torch.testing.assert_close(filt(5.0, c1), (c1 + k * c0) / (1 + k))
    # the step to σ = 0 is first order; a σ between levels passes unchanged
    assert torch.equal(filt(2.0, c1), c1) and torch.equal(filt(3.0, c1), c1)


def test_an_unguided_step_counts_as_zero_and_a_restart_forgets():
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.0]
    filt = CorrectionFilter(DPMSolver2M(), sigmas)
    c = torch.ones(1, 1, 2, 2)
    filt(10.0, c)
    k = 1 / (2 * math.log(5 / 2) / math.log(10 / 5))
    torch.testing.assert_close(filt(2.0, c), c / (1 + k))   # step 1 (σ = 5) was not guided: c'_1 = 0
    torch.testing.assert_close(filt(10.0, 2 * c), 2 * c)    # a new run from the top
    assert list(filt.fed) == [0]


# ---- weights read off a sampler function (samplers without a written-out family) ------------------------------
def as_sampler(step, flow=False):
    """A k-diffusion-style sampler function (``sample(model, x, sigmas, extra_args, callback, disable)``) from a
    written-out step above."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        levels, D, state = [float(v) for v in sigmas], [], {}
        for i in range(len(levels) - 1):
            D.append(model(x, sigmas[i] * x.new_ones([x.shape[0]])))
            x, _ = step(x, levels, i, D, state, flow)
        return x
    return sample


def lms_step(x, sigmas, i, D, state, flow, order=4):
    """k-diffusion's ``sample_lms``: Adams-Bashforth in σ on d = (x − D)/σ, each coefficient the integral of a
    Lagrange basis polynomial over [σ_i, σ_{i+1}] (here exactly, by numpy's polynomial algebra)."""
    import numpy as np
    state.setdefault("d", []).append((x - D[-1]) / sigmas[i])
    if sigmas[i + 1] == 0:
        return D[-1], 1.0
    k = min(i + 1, order)
    total = 0.0
    for j in range(k):
        poly = np.poly1d([1.0])
        for m in range(k):
            if m != j:
                poly = poly * np.poly1d([1.0, -sigmas[i - m]]) / (sigmas[i - j] - sigmas[i - m])
        integral = poly.integ()
        total = total + float(integral(sigmas[i + 1]) - integral(sigmas[i])) * state["d"][-1 - j]
    return x + total, None


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("name", list(CASES))
def test_the_probe_reads_the_written_out_families(name, flow):
    step, family = CASES[name]
    sigmas = [0.98, 0.9, 0.75, 0.55, 0.35, 0.2, 0.1, 0.04, 0.0] if flow else [14.6, 8.0, 4.5, 2.4, 1.2, 0.6, 0.3, 0.1, 0.0]
    alpha = (lambda s: 1 - s) if flow else (lambda s: 1.0)
    probed = probe_family(as_sampler(step, flow), torch.tensor(sigmas, dtype=torch.float64))
    assert probed is not None and len(probed.table) == len(sigmas) - 1
    for i, row in enumerate(probed.table):
        expected = family.weights(sigmas, i, alpha)
        assert len(row) == len(expected) and all(abs(a - b) < 1e-9 for a, b in zip(row, expected)), (i, row, expected)


def test_probed_lms_receives_the_intended_step_and_keeps_its_order():
    """LMS has no written-out family: with the probed filter the guided deviation δ of the states obeys
    δ_{i+1} = a_i δ_i + W_i c_i, a_i the sampler's response to its start and W_i = 1 − a_i its weight on a constant
    prediction; unguided, the probe changes nothing."""
    sigmas = torch.tensor([14.6, 8.0, 4.5, 2.4, 1.2, 0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    sample = as_sampler(lms_step)
    family = probe_family(sample, sigmas, name="lms")
    assert family is not None and family.history >= 3
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(len(sigmas) - 1)]
    corrections = [torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(len(sigmas) - 1)]

    def states(x0, guided, predictions=base):
        filt, seen = CorrectionFilter(family, sigmas), []

        def model(x, sigma):
            i = len(seen)
            seen.append(x.clone())
            return predictions[i] + (filt(float(sigma[0]), corrections[i]) if guided else 0)
        return seen + [sample(model, x0.clone(), sigmas)]

    start = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    plain, guided = states(start, False), states(start, True)
    zeros = [torch.zeros_like(b) for b in base]
    response = states(torch.ones_like(start), False, zeros)
    for i in range(len(sigmas) - 1):
        a = float(response[i + 1].flatten()[0] / response[i].flatten()[0]) if i < len(sigmas) - 2 else 0.0
        delta, delta_next = guided[i] - plain[i], guided[i + 1] - plain[i + 1]
        torch.testing.assert_close(delta_next - a * delta, (1 - a) * corrections[i], rtol=1e-9, atol=1e-9)


def test_the_probe_refuses_what_it_cannot_read():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    euler = as_sampler(CASES["euler"][0])

    def noisy(model, x, sigmas, extra_args=None, callback=None, disable=None):      # noise it cannot switch off
        for i in range(len(sigmas) - 1):
            d = model(x, sigmas[i] * x.new_ones([1]))
            x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i] + 0.1 * torch.randn_like(x)
        return x

    def heun(model, x, sigmas, extra_args=None, callback=None, disable=None):       # evaluates between levels
        for i in range(len(sigmas) - 1):
            d = model(x, sigmas[i] * x.new_ones([1]))
            mid = (sigmas[i] + sigmas[i + 1]) / 2
            x = x + (mid - sigmas[i]) * (x - d) / sigmas[i]
            d = model(x, mid * x.new_ones([1]))
            x = x + (sigmas[i + 1] - mid) * (x - d) / mid
        return x

    def wild(model, x, sigmas, extra_args=None, callback=None, disable=None):       # b = (0.1, 0.9): unstable
        previous = None
        for i in range(len(sigmas) - 1):
            d = model(x, sigmas[i] * x.new_ones([1]))
            mix = d if previous is None or sigmas[i + 1] == 0 else 0.1 * d + 0.9 * previous
            x = x + (sigmas[i + 1] - sigmas[i]) * (x - mix) / sigmas[i]
            previous = d
        return x

    def needs_the_host(model, x, sigmas, extra_args=None, callback=None, disable=None):
        return model.inner_model.model_sampling.noise_scaling(x)

    assert probe_family(euler, sigmas).history == 0
    assert probe_family(noisy, sigmas) is None
    assert probe_family(heun, sigmas) is None
    assert probe_family(wild, sigmas) is None
    assert probe_family(needs_the_host, sigmas) is None


def test_family_names():
    assert isinstance(family_for("sample_dpmpp_2m"), DPMSolver2M)
    assert family_for("dpmpp_2m_sde_gpu", {"eta": 0.5, "solver_type": "heun"}) == DPMSolver2MSDE(0.5, "heun")
    assert family_for("dpmpp_2m_sde_heun") == DPMSolver2MSDE(1.0, "heun")
    assert family_for("dpmpp_3m_sde_gpu", {"eta": 0.0}) == DPMSolver3MSDE(0.0)
    assert isinstance(family_for("euler_ancestral"), SingleStep)
    assert family_for("uni_pc") is None and family_for("dpm_fast_function") is None
    with pytest.raises(ValueError, match="solver"):
        family_for("dpmpp_2m_sde", {"solver_type": "rk4"})
    # a CFG++ sampler takes its base sampler's family (the correction reaches both of its predictions)
    assert base_sampler("sample_dpmpp_2m_cfg_pp") == "dpmpp_2m" and base_sampler("euler") == "euler"
    assert isinstance(family_for("dpmpp_2m_cfg_pp"), DPMSolver2M)
    assert isinstance(family_for("sample_euler_ancestral_cfg_pp"), SingleStep)


def sample_lms2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A two-step Adams-Bashforth sampler in σ (an LMS-type multistep sampler without a written-out family)."""
    old = None
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i] * x.new_ones([1]))) / sigmas[i]
        slope = d if old is None else 1.5 * d - 0.5 * old
        x, old = x + (sigmas[i + 1] - sigmas[i]) * slope, d
    return x


def sample_lms2_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Its CFG++ twin, as ComfyUI's read the unconditional prediction: through the host's model options."""
    raise RuntimeError("needs the host's CFG function")


def test_a_cfg_pp_sampler_is_probed_through_its_base_sampler():
    sigmas = torch.tensor([14.6, 8.0, 4.5, 2.4, 1.2, 0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    base, twin = sampler_family(sample_lms2, sigmas), sampler_family(sample_lms2_cfg_pp, sigmas)
    assert base is not None and base.history >= 1
    assert twin is not None and twin.table == base.table and twin.name == "sample_lms2_cfg_pp"


COMFY = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)

DRIVER = textwrap.dedent('''
    import json, math, os, sys
    sys.path.insert(0, os.environ["COMFYUI_PATH"]); sys.path.insert(0, sys.argv[1])
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.k_diffusion.sampling as ks
    from dps.samplers import CorrectionFilter, family_for

    class Inner:                      # what the SDE samplers read: model.inner_model.model_patcher
        def __init__(self): self.model_patcher = self
        def get_model_object(self, name): return object()   # not CONST: an ε/v model, λ = −log σ

    sigmas = torch.tensor([14.6, 8.0, 4.5, 2.4, 1.2, 0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    corrections = [torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(len(sigmas) - 1)]
    base = [torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(len(sigmas) - 1)]
    out = {}
    for name in ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        sample = getattr(ks, "sample_" + name)
        def final(n, guided):
            """x after the first n steps; the denoiser ignores x, so guided − unguided is the guidance alone."""
            filt = CorrectionFilter(family_for(name), sigmas)
            def model(x, sigma, **kw):
                s = float(sigma.flatten()[0]); i = [float(v) for v in sigmas].index(s)
                return base[i] + (filt(s, corrections[i]) if guided else 0)
            model.inner_model = Inner()
            zero = lambda a, b: torch.zeros(1, 2, 2, 2, dtype=torch.float64)
            kw = {} if name == "dpmpp_2m" else {"noise_sampler": zero}
            return sample(model, torch.zeros(1, 2, 2, 2, dtype=torch.float64), sigmas[:n + 1], disable=True, **kw)
        errors, previous = [], torch.zeros(1, 2, 2, 2, dtype=torch.float64)
        for n in range(1, len(sigmas)):
            diff = final(n, True) - final(n, False)
            s, s_next = float(sigmas[n - 1]), float(sigmas[n])
            eta = 0.0 if name == "dpmpp_2m" else 1.0
            h = math.log(s / s_next) if s_next > 0 else math.inf
            a = (s_next / s) * math.exp(-h * eta) if s_next > 0 else 0.0
            w = -math.expm1(-h * (eta + 1)) if s_next > 0 else 1.0
            part = diff - a * previous
            errors.append(float((part - w * corrections[n - 1]).abs().max()))
            previous = diff
        out[name] = max(errors)
    print("RESULT " + json.dumps(out))
''')


def run_driver(script, source: str) -> dict:
    """Run a driver script with ComfyUI's Python; the JSON it prints after ``RESULT ``."""
    script.write_text(source)
    out = subprocess.run([PYTHON, str(script), str(ROOT)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, COMFYUI_PATH=COMFY))
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, out.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to check against ComfyUI's own samplers")
def test_comfyuis_own_samplers_receive_the_intended_step(tmp_path):
    errors = run_driver(tmp_path / "families_driver.py", DRIVER)
    assert set(errors) == {"dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}
    assert all(e < 1e-9 for e in errors.values()), errors


FAR_DRIVER = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, os.environ["COMFYUI_PATH"]); sys.path.insert(0, sys.argv[1])
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.k_diffusion.sampling as ks
    from dps.samplers import CorrectionFilter, family_for

    class Inner:
        def __init__(self): self.model_patcher = self
        def get_model_object(self, name): return object()

    sigmas = torch.tensor([14.6, 10.0, 7.0, 5.0, 3.5, 2.5, 1.8, 1.3, 0.05, 0.0], dtype=torch.float64)
    levels, far = [float(v) for v in sigmas], 7
    g = torch.Generator().manual_seed(4)
    corrections = [torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) for _ in levels[:-1]]
    zero = lambda a, b: torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    denoise = lambda x, s: torch.tanh(0.25 / (0.25 + s * s) * x)
    out = {}
    for name in ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        sample = getattr(ks, "sample_" + name)
        kw = {} if name == "dpmpp_2m" else {"noise_sampler": zero}
        filt = CorrectionFilter(family_for(name), sigmas, max_gain=4.0)
        states = {}
        def model(x, sigma, **unused):
            s = float(sigma.flatten()[0]); i = levels.index(s)
            states[i] = x.clone()
            d = denoise(x, s)
            return d + filt(s, corrections[i], d)
        model.inner_model = Inner()
        x_T = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 14.6
        sample(model, x_T, sigmas.clone(), disable=True, **kw)
        def first(x, sigma, **unused):     # the sampler's own first step (no history) from D_far + c_far
            return denoise(x, levels[far]) + corrections[far]
        first.inner_model = Inner()
        x_next = sample(first, states[far].clone(), sigmas[far:far + 2].clone(), disable=True, **kw)
        out[name] = [float((x_next - states[far + 1]).abs().max()), filt.first_order]
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to check against ComfyUI's own samplers")
def test_comfyuis_own_samplers_take_a_far_step_at_first_order(tmp_path):
    """ComfyUI's DPM++ 2M / 2M SDE / 3M SDE functions, a nonlinear prediction: the guided step that extrapolates
    far (σ 1.3 → 0.05) lands where the sampler's own first step from D + c lands, prior included."""
    result = run_driver(tmp_path / "far_driver.py", FAR_DRIVER)
    assert set(result) == {"dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}
    assert all(error < 1e-9 and steps == [7] for error, steps in result.values()), result


PROBE_DRIVER = textwrap.dedent('''
    import inspect, json, os, sys
    from types import SimpleNamespace
    sys.path.insert(0, os.environ["COMFYUI_PATH"]); sys.path.insert(0, sys.argv[1])
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.k_diffusion.sampling as ks
    from comfy.extra_samplers import uni_pc
    from dps.samplers import CorrectionFilter, probe_family

    patcher = SimpleNamespace(get_model_object=lambda name: object())        # an ε model: not CONST
    host = SimpleNamespace(model_patcher=patcher, inner_model=SimpleNamespace(model_sampling=object()))
    functions = {name: getattr(ks, "sample_" + name) for name in (
        "lms", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_ancestral", "gradient_estimation", "er_sde")}
    functions.update(uni_pc=uni_pc.sample_unipc, uni_pc_bh2=uni_pc.sample_unipc_bh2)
    out = {}
    for steps in (8, 30):
        sigmas = ks.get_sigmas_karras(steps, 0.0292, 14.6).double()
        for name, sample in functions.items():
            family = probe_family(sample, sigmas, {}, {"inner_model": host}, name=name)
            if family is None:
                out[f"{name}/{steps}"] = None
                continue
            dtype = torch.float64 if name not in ("uni_pc", "uni_pc_bh2") else torch.float32
            g = torch.Generator().manual_seed(2)
            base = [torch.randn(1, 2, 2, 2, generator=g, dtype=dtype) for _ in range(steps)]
            corrections = [torch.randn(1, 2, 2, 2, generator=g, dtype=dtype) for _ in range(steps)]

            def states(x0, guided, predictions):
                filt, seen = CorrectionFilter(family, sigmas), []
                def model(x, sigma, **kw):
                    i = len(seen)
                    seen.append(x.clone())
                    return predictions[i] + (filt(float(sigma.flatten()[0]), corrections[i]) if guided else 0)
                model.inner_model = host
                kw = {"noise_sampler": lambda a, b: torch.zeros(1, 2, 2, 2, dtype=dtype)} if "noise_sampler" in \\
                    inspect.signature(sample).parameters else {}
                return seen + [sample(model, x0.clone(), sigmas.to(dtype).clone(), extra_args={"seed": 0}, disable=True, **kw)]

            start = torch.randn(1, 2, 2, 2, generator=g, dtype=dtype) * 14.6
            plain, guided = states(start, False, base), states(start, True, base)
            response = states(torch.ones_like(start), False, [torch.zeros_like(b) for b in base])
            errors, unfiltered = [], []
            for i in range(steps):
                r0, r1 = float(response[i].flatten()[0]), float(response[i + 1].flatten()[0])
                a = r1 / r0 if abs(r0) > 1e-30 else 0.0
                delta, delta_next = guided[i] - plain[i], guided[i + 1] - plain[i + 1]
                part = delta_next - a * delta
                intended = (1 - a) * corrections[i]
                errors.append(float((part - intended).abs().max() / intended.abs().max()))
            out[f"{name}/{steps}"] = max(errors)
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to check against ComfyUI's own samplers")
def test_comfyuis_other_multistep_samplers_receive_the_intended_step_through_the_probe(tmp_path):
    """LMS, iPNDM(-v), DEIS, res_multistep (+ ancestral), gradient estimation, ER-SDE and UniPC (bh1, bh2), 8 and 30
    karras steps: the weights probed from ComfyUI's own functions make the guided deviation of the states obey
    δ_{i+1} = a_i δ_i + (1 − a_i) c_i (a_i: the sampler's response to its start)."""
    errors = run_driver(tmp_path / "probe_driver.py", PROBE_DRIVER)
    assert len(errors) == 20 and all(e is not None for e in errors.values()), errors
    assert all(e < (1e-3 if k.startswith("uni_pc") else 1e-8) for k, e in errors.items()), errors


CFG_PP_DRIVER = textwrap.dedent('''
    import inspect, json, os, sys
    sys.path.insert(0, os.environ["COMFYUI_PATH"]); sys.path.insert(0, sys.argv[1])
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.k_diffusion.sampling as ks
    import comfy.samplers
    from dps.samplers import CorrectionFilter, base_sampler, sampler_family

    class Inner:   # what the samplers read: model.inner_model.model_patcher, .inner_model.model_sampling
        def __init__(self): self.model_patcher, self.inner_model, self.model_sampling = self, self, object()
        def get_model_object(self, name): return object()   # not CONST: an ε/v model, λ = −log σ

    sigmas = torch.tensor([14.6, 8.0, 4.5, 2.4, 1.2, 0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    zero = lambda a, b: torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    denoise = lambda x, s: torch.tanh(0.25 / (0.25 + s * s) * x)
    correct = lambda x, s: 0.3 * torch.cos(x + s)          # the rule's correction: any function of the point
    # dpmpp_2s_ancestral_cfg_pp's update reads the unconditional prediction of its second evaluation beside the
    # guided one of its first: it is not its base sampler even unguided (its guidance part differs by
    # (σ_down/σ)(c_1 − c_2))
    names = [n for n in comfy.samplers.KSAMPLER_NAMES if n.endswith("_cfg_pp") and "2s_" not in n]
    out = {}
    for name in names:
        runs = []
        for sample in (getattr(ks, "sample_" + name), getattr(ks, "sample_" + base_sampler(name))):
            family = sampler_family(sample, sigmas, {}, {"inner_model": Inner()})
            filt = CorrectionFilter(family, sigmas) if family is not None and family.history else None
            def model(x, sigma, model_options=None, **unused):
                s = float(sigma.flatten()[0])
                d = denoise(x, s)
                c = correct(x, s)
                fed = d + (filt(s, c, d) if filt is not None else c)
                for fn in (model_options or {}).get("sampler_post_cfg_function", []):   # as the node feeds them
                    fed = fn({"denoised": fed, "uncond_denoised": fed, "cond_denoised": fed})
                return fed
            model.inner_model = Inner()
            x_T = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 14.6
            kw = {"noise_sampler": zero} if "noise_sampler" in inspect.signature(sample).parameters else {}
            runs.append((sample(model, x_T, sigmas.clone(), extra_args={}, disable=True, **kw),
                         None if family is None else getattr(family, "table", family.name)))
        (a, fa), (b, fb) = runs
        out[name] = [float((a - b).abs().max()), fa == fb]
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to check against ComfyUI's own samplers")
def test_comfyuis_cfg_pp_samplers_receive_the_correction_as_their_base_samplers(tmp_path):
    """ComfyUI's CFG++ samplers (but DPM++ 2S, see the driver), a nonlinear prediction, the correction fed to both
    predictions as the node feeds it: the guided run is its base sampler's guided run (the same family, the same
    states)."""
    errors = run_driver(tmp_path / "cfg_pp_driver.py", CFG_PP_DRIVER)
    assert len(errors) == 6, errors
    assert all(same and e < 1e-9 for e, same in errors.values()), errors


# ---- the ComfyUI adapter: OUTER_SAMPLE tells the sampler, PREDICT_NOISE feeds the filtered correction ----------
class KSampler:
    """ComfyUI's KSAMPLER, reduced: the k-diffusion function and its options, called by the fake guider."""

    def __init__(self, function, extra_options=None):
        self.sampler_function, self.extra_options = function, extra_options or {}

    def __call__(self, model, x, sigmas):
        return self.sampler_function(model, x, sigmas)


def _comfy():
    import test_comfy_adapter as fakes   # the pack loaded as ComfyUI loads it, and fakes of ComfyUI's objects
    return fakes


def test_comfy_adapter_filters_the_correction_of_a_multistep_sampler():
    fakes = _comfy()
    patcher, vae, clean, operator, noise, measurement = fakes.setup_sr()
    y = measurement.movedim(-1, 1) * 2 - 1
    with torch.inference_mode():
        guided, patch = fakes.hook.apply_dps(patcher, vae, measurement, operator, noise, fakes.Settings())
    out = fakes.run(guided, vae, KSampler(fakes.dpmpp_2m))
    run_state = patch.last_run
    assert run_state.sampler_filter.family.name == "dpmpp_2m"   # the pack's copy of dps.samplers
    assert sorted(run_state.sampler_filter.fed) == list(range(len(fakes.SIGMAS) - 1))
    plain = fakes.residual(operator, y, fakes.run(patcher, vae, KSampler(fakes.dpmpp_2m)))
    assert torch.isfinite(out).all() and float(fakes.residual(operator, y, out)) < 0.6 * float(plain)
    # the fed corrections are the 2M recursion of the rule's corrections: not the plain ones after the first step
    unfiltered = fakes.run(guided, vae, fakes.dpmpp_2m)          # a bare function: no family, the plain correction
    assert patch.last_run.sampler_filter is None and not torch.allclose(out, unfiltered)


def test_comfy_adapter_keeps_single_step_samplers_and_tells_an_unknown_one_once(caplog):
    fakes = _comfy()
    patcher, vae, clean, operator, noise, measurement = fakes.setup_sr()
    with torch.inference_mode():
        guided, patch = fakes.hook.apply_dps(patcher, vae, measurement, operator, noise, fakes.Settings())

    def sample_euler(model, x, sigmas):
        return fakes.euler(model, x, sigmas)

    def sample_unipc(model, x, sigmas):
        return fakes.euler(model, x, sigmas)

    euler_out = fakes.run(guided, vae, KSampler(sample_euler))
    assert patch.last_run.sampler_filter is None
    assert torch.equal(euler_out, fakes.run(guided, vae, fakes.euler))   # today's behaviour, to the bit
    with caplog.at_level("INFO", logger="dps_guidance"):
        fakes.run(guided, vae, KSampler(sample_unipc))
        fakes.run(guided, vae, KSampler(sample_unipc))
    told = [r for r in caplog.records if "sample_unipc" in r.getMessage()]
    assert len(told) == 1 and "single-step" in told[0].getMessage()


# ---- samplers with several stages per step: one correction per step -------------------------------------------
def heun_step(model, x, s, s_next):
    """k-diffusion's ``sample_heun`` step (no churn): Euler to σ_{i+1}, then the trapezoid of the two slopes."""
    d = (x - model(x, s)) / s
    dt = s_next - s
    if s_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = (x_2 - model(x_2, s_next)) / s_next
    return x + (d + d_2) / 2 * dt


def dpm_2_step(model, x, s, s_next):
    """k-diffusion's ``sample_dpm_2`` step (no churn): the slope at the log-midpoint σ_m."""
    d = (x - model(x, s)) / s
    if s_next == 0:
        return x + d * (s_next - s)
    s_mid = math.exp((math.log(s) + math.log(s_next)) / 2)
    x_2 = x + d * (s_mid - s)
    d_2 = (x_2 - model(x_2, s_mid)) / s_mid
    return x + d_2 * (s_next - s)


STAGED_STEPS = {"heun": heun_step, "dpm_2": dpm_2_step}


def _staged_step(step, clock, prediction, correct, x, s, s_next):
    """One step whose model feeds the correction ``c = correct(x, σ_i)`` as the node does: through ``clock``
    (computed at the first evaluation, fed to the second), or, without one, recomputed at every evaluation."""
    def model(x_, sigma):
        if clock is not None and clock.later_stage(sigma):
            held = clock.later_feed(sigma)
            return prediction(x_, sigma) + (held if held is not None else 0)
        c = correct(x_, sigma)
        return prediction(x_, sigma) + (clock.first_feed(c) if clock is not None else c)
    return step(model, x, s, s_next)


@pytest.mark.parametrize("name", sorted(STAGED_STEPS))
def test_a_staged_sampler_takes_its_own_prior_step_plus_eulers_step_of_the_correction(name):
    """With a prediction that depends on x (nonlinearly), each guided step equals the sampler's unguided step
    from the same state plus (1 − σ_{i+1}/σ_i) c_i, Euler's step of the correction; a correction recomputed at
    the second evaluation misses it by far in the last steps."""
    from dps.samplers import stage_clock
    sigmas = [14.6, 8.0, 4.0, 1.5, 0.5, 0.1, 0.0]
    g = torch.Generator().manual_seed(0)
    base, direction = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    prediction = lambda x, s: torch.tanh(x / (1 + s)) * (1 + s) * 0.9 + base * math.cos(s)
    correct = lambda x, s: direction * (1 + s) + 0.1 * x           # differs between a step's evaluations
    zero = lambda x, s: torch.zeros_like(x)
    step = STAGED_STEPS[name]
    clock = stage_clock(name, sigmas)
    x = torch.randn(4, generator=g, dtype=torch.float64) * 14.6
    errors, errors_recomputed = [], []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        plain = _staged_step(step, None, prediction, zero, x, s, s_next)
        intended = plain + (1 - s_next / s) * correct(x, s)
        recomputed = _staged_step(step, None, prediction, correct, x, s, s_next)
        x_next = _staged_step(step, clock, prediction, correct, x, s, s_next)
        scale = float((intended - plain).abs().max())
        errors.append(float((x_next - intended).abs().max()) / scale)
        errors_recomputed.append(float((recomputed - intended).abs().max()) / scale)
        x = x_next
    assert max(errors) < 1e-12, errors
    assert max(errors_recomputed) > 0.3, errors_recomputed


def test_the_stage_clock_tells_second_evaluations_by_where_they_lie():
    from dps.samplers import stage_clock
    levels = [10.0, 5.0, 2.0, 1.0, 0.0]
    heun = stage_clock("sample_heun", levels)                  # σ_i, then σ_{i+1}; the last step is Euler's
    assert [heun.later_stage(s) for s in (10, 5, 5, 2, 2, 1, 1)] == [False, True, False, True, False, True, False]
    dpm_2 = stage_clock("dpm_2", levels)                       # σ_i, then the midpoint
    assert [dpm_2.later_stage(s) for s in (10, 7.07, 5, 3.16, 2)] == [False, True, False, True, False]
    assert all(stage_clock(name, levels) is None for name in ("euler", "dpmpp_2m", "heunpp2"))
    assert stage_clock("dpm_fast", levels, {"eta": 1.0}) is None     # η > 0: other steps
    c = torch.ones(1)
    assert torch.equal(dpm_2.first_feed(c), torch.zeros(1))   # at σ = 2: the midpoint follows
    assert dpm_2.later_stage(2 ** 0.5) and torch.equal(dpm_2.later_feed(2 ** 0.5), c * 2 ** 0.5 / 2)
    dpm_2.later_stage(1.0)                                     # a new step forgets the last step's correction
    assert dpm_2.later_feed(0.7) is None and torch.equal(dpm_2.first_feed(c), c)   # σ = 1 -> 0: Euler's step


def dpm_solver_step(model, x, s, s_next, order):
    """One step of k-diffusion's ``DPMSolver`` (``dpm_solver_1/2/3_step``) in t = −log σ, ε = (x − D)/σ."""
    sigma = lambda t: math.exp(-t)
    eps = lambda x_, t: (x_ - model(x_, sigma(t))) / sigma(t)
    t, t_next = -math.log(s), -math.log(s_next)
    h = t_next - t
    e = eps(x, t)
    if order == 1:
        return x - sigma(t_next) * math.expm1(h) * e
    if order == 2:
        r1 = 1 / 2
        s1 = t + r1 * h
        u1 = x - sigma(s1) * math.expm1(r1 * h) * e
        e1 = eps(u1, s1)
        return x - sigma(t_next) * math.expm1(h) * e - sigma(t_next) / (2 * r1) * math.expm1(h) * (e1 - e)
    r1, r2 = 1 / 3, 2 / 3
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - sigma(s1) * math.expm1(r1 * h) * e
    e1 = eps(u1, s1)
    u2 = (x - sigma(s2) * math.expm1(r2 * h) * e
          - sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e))
    e2 = eps(u2, s2)
    return x - sigma(t_next) * math.expm1(h) * e - sigma(t_next) / r2 * (math.expm1(h) / h - 1) * (e2 - e)


@pytest.mark.parametrize("n", [7, 8, 9])
def test_dpm_fast_takes_its_own_prior_step_plus_eulers_step_of_the_correction(n):
    """DPM-Solver-fast's steps (orders 3, ..., then n mod 3, or 2 and 1): each guided step is the unguided one
    from the same state plus (1 − σ_{i+1}/σ_i) c_i; the clock's stage labels follow the solver's evaluations."""
    from dps.samplers import dpm_fast_steps, stage_clock
    schedule = [14.6 * (0.02 / 14.6) ** (k / (n - 1)) for k in range(n)] + [0.0]
    steps = dpm_fast_steps(schedule)
    assert sum(order for _, _, order in steps) == n
    assert steps[0][0] == pytest.approx(14.6) and steps[-1][1] == pytest.approx(0.02)
    g = torch.Generator().manual_seed(0)
    base, direction = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    prediction = lambda x, s: torch.tanh(x / (1 + s)) * (1 + s) * 0.9 + base * math.cos(s)
    correct = lambda x, s: direction * (1 + s) + 0.1 * x
    clock = stage_clock("dpm_fast_function", schedule)
    x = torch.randn(4, generator=g, dtype=torch.float64) * 14.6
    for s, s_next, order in steps:
        plain = dpm_solver_step(prediction, x, s, s_next, order)
        seen = []

        def model(x_, sigma):
            seen.append(clock.later_stage(sigma))
            if seen[-1]:
                held = clock.later_feed(sigma)
                return prediction(x_, sigma) + (held if held is not None else 0)
            return prediction(x_, sigma) + clock.first_feed(correct(x_, sigma))

        x_next = dpm_solver_step(model, x, s, s_next, order)
        assert seen == [False] + [True] * (order - 1)
        intended = plain + (1 - s_next / s) * correct(x, s)
        scale = float(((1 - s_next / s) * correct(x, s)).abs().max())
        assert float((x_next - intended).abs().max()) < 1e-7 * scale, (order, s)   # float64 rounding of x ~ 30
        x = x_next


STAGED_DRIVER = textwrap.dedent('''
    import json, math, os, sys
    sys.path.insert(0, os.environ["COMFYUI_PATH"]); sys.path.insert(0, sys.argv[1])
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.k_diffusion.sampling as ks
    from dps.samplers import stage_clock

    full = ks.get_sigmas_karras(12, 0.0292, 14.6).double()
    g = torch.Generator().manual_seed(0)
    base, direction = (torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    prediction = lambda x, s: torch.tanh(x / (1 + s)) * (1 + s) * 0.9 + base * math.cos(s)
    correct = lambda x, s: direction * (1 + s) + 0.1 * x
    out = {}
    for name in ("heun", "dpm_2"):
        sample = getattr(ks, "sample_" + name)
        x, errors = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) * 14.6, []
        for i in range(len(full) - 1):
            sigmas = full[i:i + 2].clone()             # one step of ComfyUI's function at a time
            clock = stage_clock(sample, full)
            clock.previous = None

            def model(x_, sigma, guided=True, **kw):
                s = float(sigma.flatten()[0])
                if clock.later_stage(s):
                    held = clock.later_feed(s)
                    return prediction(x_, s) + (held if held is not None and guided else 0)
                c = correct(x_, s)
                return prediction(x_, s) + (clock.first_feed(c) if guided else 0)

            plain = sample(lambda x_, sigma, **kw: model(x_, sigma, guided=False), x.clone(), sigmas.clone(),
                           extra_args={}, disable=True)
            clock.previous = None
            x_next = sample(model, x.clone(), sigmas.clone(), extra_args={}, disable=True)
            s, s_next = float(full[i]), float(full[i + 1])
            intended = plain + (1 - s_next / s) * correct(x, s)
            errors.append(float((x_next - intended).abs().max() / ((1 - s_next / s) * correct(x, s)).abs().max()))
            x = x_next
        out[name] = max(errors)

    # DPM-Solver-fast: its own steps, each of ComfyUI's DPMSolver step functions guided through the clock; and the
    # clock's labels along a whole sample_dpm_fast run (as ComfyUI's dpm_fast_function calls it)
    from dps.samplers import dpm_fast_steps
    for n in (7, 9):
        levels = ks.get_sigmas_karras(n, 0.0292, 14.6).double()
        clock = stage_clock("dpm_fast_function", levels)
        x, errors = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) * 14.6, []

        def guided(x_, sigma, **kw):
            s = float(sigma.flatten()[0])
            if clock.later_stage(s):
                held = clock.later_feed(s)
                return prediction(x_, s) + (held if held is not None else 0)
            return prediction(x_, s) + clock.first_feed(correct(x_, s))

        for s, s_next, order in dpm_fast_steps([float(v) for v in levels]):
            t, t_next = torch.tensor(-math.log(s), dtype=torch.float64), torch.tensor(-math.log(s_next), dtype=torch.float64)
            def one(model):
                solver = ks.DPMSolver(model, extra_args={})
                return getattr(solver, f"dpm_solver_{order}_step")(x, t, t_next)[0]
            plain = one(lambda x_, sigma, **kw: prediction(x_, float(sigma.flatten()[0])))
            x_next = one(guided)
            part = (1 - s_next / s) * correct(x, s)
            errors.append(float((x_next - plain - part).abs().max() / part.abs().max()))
            x = x_next
        out[f"dpm_fast/{n}"] = max(errors)
        labels, finals, clock = [], [], stage_clock("dpm_fast_function", levels)
        def recorder(x_, sigma, **kw):
            s = float(sigma.flatten()[0])
            labels.append(clock.later_stage(s, x_))
            d = prediction(x_, s)
            final = clock.final_output(s, x_)
            if final is not None:
                finals.append(final[0] + final[1] * d)
            return d
        x_end = ks.sample_dpm_fast(recorder, torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64) * 14.6,
                                   levels[-2], levels[0], n, disable=True)
        expected = [later for _, _, order in dpm_fast_steps([float(v) for v in levels])
                    for later in [False] + [True] * (order - 1)]
        out[f"dpm_fast/{n}/labels"] = labels == expected
        # (its steps' t come from torch.linspace in float32: the clock's σ agree to ~1e-7)
        gap = float((finals[0] - x_end).abs().max() / x_end.abs().max()) if len(finals) == 1 else math.inf
        out[f"dpm_fast/{n}/final"] = gap < 1e-6
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to check against ComfyUI's own samplers")
def test_comfyuis_staged_samplers_take_their_prior_step_plus_eulers_step_of_the_correction(tmp_path):
    """ComfyUI's own Heun and DPM-2, 12 karras steps (one step at a time, each from the guided state), and the
    steps of its DPM-Solver-fast (7 and 9 evaluations): the guided step is the function's unguided step from the
    same state plus Euler's step of the correction; the clock labels a whole ``sample_dpm_fast`` run's
    evaluations as its steps make them, and the x it returns is the one ``StageClock.final_output`` foretells at
    the last evaluation."""
    out = run_driver(tmp_path / "staged_driver.py", STAGED_DRIVER)
    errors = {k: v for k, v in out.items() if not k.endswith(("/labels", "/final"))}
    assert set(errors) == {"heun", "dpm_2", "dpm_fast/7", "dpm_fast/9"}, out
    assert all(e < 1e-7 for e in errors.values()), errors
    assert all(out[f"dpm_fast/{n}/{check}"] is True for n in (7, 9) for check in ("labels", "final")), out


@pytest.mark.parametrize("n", [7, 8, 9])
def test_dpm_fast_lands_its_last_step_on_the_refined_x(n):
    """DPM-Solver-fast returns the x of its last step (to the smallest positive σ), not a prediction: at that
    step's last evaluation ``StageClock.final_output`` gives x_end as base + gain·D, exactly the solver's result,
    and ``dps.host.final_stage_refinement`` moves D so that the solver lands on the refined x (here a
    measurement with a mask and no decoder, whose one Polyak step lands on the noise floor)."""
    from dps.host import final_stage_refinement
    from dps.noise import Gaussian
    from dps.operators import Inpainting
    from dps.guidance import DPSGuidance
    from dps.samplers import dpm_fast_steps, stage_clock
    schedule = torch.tensor([14.6 * (0.02 / 14.6) ** (k / (n - 1)) for k in range(n)] + [0.0]).tolist()  # float32
    steps = dpm_fast_steps(schedule)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    prediction = lambda x, s: torch.tanh(x / (1 + s)) * (1 + s) * 0.9 + base * math.cos(s)
    mask = torch.zeros(4, 4, dtype=torch.float64)
    mask[:, :2] = 1.0
    y = Inpainting(mask)(torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64))
    guidance = DPSGuidance(Inpainting(mask), Gaussian(0.05), y, zeta=1.0, rule="polyak")
    x = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64) * 14.6
    for k, (s, s_next, order) in enumerate(steps):
        last = k == len(steps) - 1
        clock, finals, refined = stage_clock("dpm_fast_function", schedule), [], []

        def model(x_, sigma, refine):
            clock.later_stage(sigma, x_)
            d = prediction(x_, sigma)
            final = clock.final_output(sigma, x_)
            if final is not None:
                finals.append(final[0] + final[1] * d)
            return final_stage_refinement(guidance, clock, sigma, x_, d, distances=refined) if refine else d

        for s0, _, _ in steps[:k]:              # the clock where a whole run has it at step k
            clock.later_stage(s0)
        clock.previous = None
        plain = dpm_solver_step(lambda x_, sigma: model(x_, sigma, False), x, s, s_next, order)
        assert len(finals) == (1 if last else 0)
        if last:
            torch.testing.assert_close(finals[0], plain, rtol=0, atol=1e-12)
            finals.clear()
            landed = dpm_solver_step(lambda x_, sigma: model(x_, sigma, True), x, s, s_next, order)
            distance = float(guidance.noise.distance(y, Inpainting(mask)(landed)))
            assert distance == pytest.approx(float(guidance.noise.expected_distance(y)), rel=1e-6)
            assert float(guidance.noise.distance(y, Inpainting(mask)(plain))) > 2 * distance
            assert len(refined) == 1
        x = plain
