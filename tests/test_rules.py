"""Step rules in one registry (``dps.rules``), the core's progress clock and autograd-safe helpers."""

import math

import pytest
import torch

from dps import rules
from dps.autograd_safe import autograd_copy, autograd_safe, make_autograd_safe, needs_autograd_fix, normal_tensor
from dps.guidance import RULES, DPSGuidance, GuidanceResult
from dps.host import HOST_RULE, HOST_ZETA, eps_correction, guided_denoised
from dps.noise import Gaussian
from dps.operators import SuperResolution
from dps.progress import sigma_progress, step_progress
from dps.sampling import ddpm_sample, euler_sample


def _problem(batch=2, size=8):
    g = torch.Generator().manual_seed(0)
    op = SuperResolution(2)
    x0 = 0.5 * torch.randn(batch, 3, size, size, generator=g)
    return op, op(x0), torch.randn(batch, 3, size, size, generator=g)


def test_rules_come_from_the_registry():
    assert RULES == tuple(rules.REGISTRY) == ("dps", "dps_paper", "schedule", "polyak", "proximal")
    assert all(rules.get_rule(name).name == name for name in RULES)
    with pytest.raises(ValueError, match="rule must be one of"):
        rules.get_rule("nope")
    with pytest.raises(ValueError, match="already registered"):
        rules.register(type("Again", (rules.StepRule,), {"name": "dps"}))


@pytest.fixture
def toy_rule(monkeypatch):
    """A new rule is one class and one registry line; the registry is restored afterwards."""
    monkeypatch.setattr(rules, "REGISTRY", dict(rules.REGISTRY))

    @rules.register
    class Toy(rules.StepRule):
        """Half the gradient, applied as a rate (σ-space) and not at all in DDPM."""

        name = "toy"

        def direction(self, guidance, result, jacobian=1.0, limit=None):
            return 0.5 * result.grad

        def denoised_correction(self, grad, sigma, delta_sigma, zeta, alpha=1.0):
            return -zeta * grad

        def ddpm_step_size(self, zeta, beta, alpha_cumprod=None):
            return 0.0

    return Toy


def test_a_registered_rule_works_through_dpsguidance_and_the_hosts_step(toy_rule):
    op, y, x = _problem()
    guidance = DPSGuidance(op, Gaussian(0.05), y, zeta=0.7, rule="toy")
    assert isinstance(guidance.step_rule, toy_rule)
    result = guidance.evaluate(x, lambda x_: 0.5 * x_)
    reference = DPSGuidance(op, Gaussian(0.05), y, rule="dps").evaluate(x, lambda x_: 0.5 * x_)
    torch.testing.assert_close(guidance.step_gradient(result), 0.5 * reference.grad)
    guided = guided_denoised(result, guidance, 2.0, 0.5, x)
    torch.testing.assert_close(guided, result.x0_hat - 0.7 * 0.5 * reference.grad)
    # its DDPM size (0) is what the reference sampler uses: the guided run is the unguided one
    eps = lambda x_, t: 0.3 * x_  # noqa: E731
    kw = dict(shape=(2, 3, 8, 8), steps=5, clip_x0=False)
    plain = ddpm_sample(eps, generator=torch.Generator().manual_seed(1), **kw)
    guided_run = ddpm_sample(eps, guidance=guidance, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(guided_run, plain)


def test_every_rule_has_every_form():
    op, y, x = _problem()
    for name in RULES:
        guidance = DPSGuidance(op, Gaussian(0.05), y, zeta=0.5, rule=name)
        result = guidance.evaluate(x, lambda x_: 0.5 * x_)
        c = guided_denoised(result, guidance, 2.0, 0.4, x) - result.x0_hat
        e = eps_correction(guidance, result, x, 0.3, 0.5)
        size = guidance.step_rule.ddpm_step_size(0.5, 0.02, 0.3)
        assert torch.isfinite(c).all() and torch.isfinite(e).all() and math.isfinite(size), name


@pytest.mark.parametrize("name", ["dps", "dps_paper"])
def test_eps_form_moves_one_ddim_step_by_the_x_space_step(name):
    """DDIM x_next = √ᾱ' x0 + √(1−ᾱ') ε with x0 = (x − √(1−ᾱ) ε)/√ᾱ; ε + δ moves it by exactly −ζ·direction."""
    op, y, x = _problem()
    guidance = DPSGuidance(op, Gaussian(0.05), y, zeta=0.3, rule=name)
    result = guidance.evaluate(x, lambda x_: 0.5 * x_)
    ac, ac_next = 0.3, 0.5
    eps = torch.randn_like(x)

    def ddim(e):
        x0 = (x - math.sqrt(1 - ac) * e) / math.sqrt(ac)
        return math.sqrt(ac_next) * x0 + math.sqrt(1 - ac_next) * e

    delta = eps_correction(guidance, result, x, ac, ac_next)
    torch.testing.assert_close(ddim(eps + delta) - ddim(eps), -0.3 * guidance.step_gradient(result),
                               rtol=1e-4, atol=1e-5)


def test_defaults_are_one_mapping_per_sampler_family():
    assert (HOST_RULE, HOST_ZETA) == (rules.DEFAULTS["sigma"].rule, rules.DEFAULTS["sigma"].zeta)
    g = DPSGuidance(SuperResolution(2), Gaussian(0.05), torch.zeros(1, 3, 4, 4))
    assert (g.rule, g.zeta) == (rules.DEFAULTS["ddpm"].rule, rules.DEFAULTS["ddpm"].zeta)
    from dps_webui.settings import DPSSettings
    assert (DPSSettings().rule, DPSSettings().zeta) == (HOST_RULE, HOST_ZETA)


def test_progress_clock():
    assert [step_progress(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert step_progress(0, 1) == 0.0
    assert sigma_progress(10.0, 10.0, 0.1) == 0.0 and sigma_progress(0.1, 10.0, 0.1) == 1.0
    assert math.isclose(sigma_progress(1.0, 10.0, 0.1), 0.5)
    assert sigma_progress(20.0, 10.0, 0.1) == 0.0 and sigma_progress(0.01, 10.0, 0.1) == 1.0   # clamped
    assert sigma_progress(3.0, 3.0, None) == 0.0 and sigma_progress(2.0, 3.0, None) == 1.0     # no span


def test_the_reference_sampler_reads_its_window_on_the_clock():
    """euler_sample guides exactly where sigma_progress lies in [start, end]."""
    op, y, _ = _problem(batch=1)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    seen = []

    def denoiser(x_, s):
        seen.append(torch.is_grad_enabled())   # guided evaluations build a graph, unguided ones do not
        return 0.2 * x_

    guidance = DPSGuidance(op, Gaussian(0.05), y, zeta=1.0, rule="polyak", start=0.3, end=0.8)
    euler_sample(denoiser, torch.randn(1, 3, 8, 8), sigmas, guidance=guidance)
    expected = [0.3 <= sigma_progress(float(s), 8.0, 0.5) <= 0.8 for s in sigmas[:-1]]
    assert seen == expected and any(seen) and not all(seen)


def test_autograd_safe_helpers():
    with torch.inference_mode():
        t = torch.ones(3)
        module = torch.nn.Linear(2, 2)
        assert autograd_safe(t) is t          # inside inference mode nothing needs copying
    safe = autograd_safe(t)
    assert not safe.is_inference() and torch.equal(safe, t)
    assert not normal_tensor(t).is_inference()
    copy = autograd_copy(module)
    assert not any(p.is_inference() or p.requires_grad for p in copy.parameters())
    assert needs_autograd_fix([module, None]) and make_autograd_safe([module]) == 2
    assert not needs_autograd_fix([module])
    x = torch.ones(1, 2, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None


def test_guidance_result_is_untouched_by_the_rules():
    """The rules' forms take a result and return new tensors; the result stays as evaluated."""
    op, y, x = _problem()
    guidance = DPSGuidance(op, Gaussian(0.05), y, zeta=1.0, rule="polyak")
    result = guidance.evaluate(x, lambda x_: 0.5 * x_)
    before = GuidanceResult(result.x0_hat.clone(), result.distance.clone(), result.grad.clone())
    guided_denoised(result, guidance, 2.0, 0.5, x)
    assert torch.equal(result.grad, before.grad) and torch.equal(result.x0_hat, before.x0_hat)


def test_polyak_never_removes_more_than_the_whole_excess_in_one_step():
    """An Euler step removes ζΔσ/σ of the excess residual; the rule caps that fraction at 1 (ζ = 3 on the last
    step to σ = 0 would otherwise overshoot past the noise floor threefold) and leaves ζ ≤ 1 alone."""
    grad = torch.ones(1, 1, 2, 2)
    polyak = rules.get_rule("polyak")
    assert torch.equal(polyak.denoised_correction(grad, 1.0, 1.0, 3.0), -grad)          # last step: all of it
    assert torch.equal(polyak.denoised_correction(grad, 2.0, 0.5, 3.0), -3.0 * grad)    # 3 x 0.25 < 1: as is
    assert torch.equal(polyak.denoised_correction(grad, 2.0, 1.0, 3.0), -2.0 * grad)    # capped at σ/Δσ = 2
    assert torch.equal(polyak.denoised_correction(grad, 1.0, 1.0, 1.0), -grad)          # ζ = 1: never capped
    assert torch.equal(polyak.denoised_correction(grad, 1.0, None, 3.0), -3.0 * grad)   # step unknown: as is
    assert polyak.ddpm_step_size(30.0, 0.5, 0.01) == 1.0


def test_the_last_prediction_is_brought_to_the_noise_floor_and_no_further():
    """``dps.host.final_refinement``: with a mask (orthonormal rows) and no decoder one Polyak step in x0-space
    lands exactly on the noise floor, the hidden pixels do not move, later steps change nothing; the paper's
    ``dps`` rule is left alone."""
    from dps.host import final_refinement, is_last_step
    from dps.operators import Inpainting
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1.0                                     # 1 = missing
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    noise = Gaussian(0.05)
    y = Inpainting(mask)(truth) + 0.05 * torch.randn(1, 3, 8, 8, generator=g) * (1 - mask)
    guidance = DPSGuidance(Inpainting(mask), noise, y, zeta=1.0, rule="polyak")
    x0 = torch.zeros(1, 3, 8, 8)
    floor = float(noise.expected_distance(y))
    start = float(noise.distance(y, Inpainting(mask)(x0)))
    once = final_refinement(guidance, x0, iterations=1)
    assert start > 5 * floor
    assert float(noise.distance(y, Inpainting(mask)(once))) == pytest.approx(floor, rel=1e-4)
    assert torch.equal(once[..., :4], x0[..., :4])
    torch.testing.assert_close(final_refinement(guidance, x0, iterations=3), once, rtol=1e-5, atol=1e-5)
    paper = DPSGuidance(Inpainting(mask), noise, y, zeta=1.0, rule="dps")
    assert torch.equal(final_refinement(paper, x0), x0)
    assert is_last_step(0.17, 0.17) and not is_last_step(0.17, 0.16) and not is_last_step(0.17, None)


def test_one_guided_step_moves_x_by_at_most_a_share_of_the_next_level():
    """``dps.host.step_limit``: when one step jumps far down the schedule (few steps), the Euler move ``(Δσ/σ)·c``
    of the correction is at most ``MOVE_SHARE·√(σ_next² + RMS(x0_hat)²)``; with a small step, and on the step to
    σ = 0, the trust region is the sample's own RMS as before."""
    from dps.host import MOVE_SHARE, guided_correction, step_limit
    from dps.guidance import rms
    op, y, _ = _problem(batch=2)
    x = 10.0 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    guidance = DPSGuidance(op, Gaussian(0.05), y, zeta=1.0, rule="polyak")
    result = guidance.evaluate(x, lambda x_: 0.01 * x_)          # a denoiser that hardly follows x: long Polyak step
    sigma, delta = 10.0, 8.0                                      # σ_next = 2
    move = rms(guided_correction(result, guidance, sigma, delta, x)) * delta / sigma
    size_next = (2.0**2 + rms(result.x0_hat).square()).sqrt()
    torch.testing.assert_close(move, MOVE_SHARE * size_next)     # the bound acts, per sample
    torch.testing.assert_close(step_limit(x, result.x0_hat, sigma, 0.5), rms(x))       # many steps: RMS(x)
    torch.testing.assert_close(step_limit(x, result.x0_hat, sigma, sigma), rms(x))     # the step to σ = 0
    torch.testing.assert_close(step_limit(x, result.x0_hat, sigma, None), rms(x))      # step unknown
    assert bool((rms(guided_correction(result, guidance, sigma, 0.5, x)) <= rms(x) * 1.0001).all())
    # a timestep sampler (DDIM, ``eps_correction``): the same bound on x/√ᾱ, where DDIM is Euler in σ
    ac, ac_next = 0.01, 0.5                                        # σ = √99 ≈ 9.95 -> σ_next = 1
    sigma, sigma_next = math.sqrt((1 - ac) / ac), 1.0
    x_t = math.sqrt(ac) * x
    result_t = guidance.evaluate(x_t, lambda x_: 0.01 * x_)
    move = rms(eps_correction(guidance, result_t, x_t, ac, ac_next)) * (sigma - sigma_next)   # DDIM: Δσ·δ on x/√ᾱ
    torch.testing.assert_close(move, MOVE_SHARE * (sigma_next**2 + rms(result_t.x0_hat).square()).sqrt())
