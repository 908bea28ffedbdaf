import math
import warnings

import pytest
import torch

from dps.guidance import DPSGuidance, GuidanceDivergedError, ddpm_step_size, denoised_correction
from dps.noise import Gaussian, Noiseless
from dps.operators import GaussianBlur, Inpainting, SuperResolution
from dps.sampling import ddim_sample, ddpm_posterior_step, ddpm_sample, euler_sample, heun_sample, tweedie_x0
from dps.schedule import alphas_cumprod_from_betas, linear_betas, respace


def gaussian_prior_eps(scale: float = 0.5):
    """ε-model of the prior x0 ~ N(0, scale² I): E[x0|x_t] = √ᾱ s² x_t / (ᾱ s² + 1 − ᾱ)."""
    ac_all = alphas_cumprod_from_betas(linear_betas())

    def eps(x, t):
        ac = ac_all[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = ac.sqrt() * scale**2 * x / (ac * scale**2 + 1 - ac)
        return (x - ac.sqrt() * x0) / (1 - ac).sqrt()
    return eps


def gaussian_prior_denoiser(scale: float = 0.5):
    """D(x, σ) for x = x0 + σε with x0 ~ N(0, s² I)."""
    return lambda x, sigma: scale**2 / (scale**2 + sigma.view(-1, 1, 1, 1) ** 2) * x


def make_problem(batch=2, size=16):
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(batch, 3, size, size, generator=g)
    op = SuperResolution(2)
    return x0, op, op(x0)


def test_zero_zeta_is_an_exact_no_op():
    _, op, y = make_problem()
    eps = gaussian_prior_eps()
    kw = dict(shape=(2, 3, 16, 16), steps=20)
    plain = ddpm_sample(eps, generator=torch.Generator().manual_seed(1), **kw)
    guided = ddpm_sample(eps, guidance=DPSGuidance(op, Gaussian(0.05), y, zeta=0.0),
                         generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(plain, guided)


def test_one_ddpm_step_equals_the_paper_update_by_hand():
    _, op, y = make_problem(batch=1)
    eps = gaussian_prior_eps()
    zeta, steps = 0.7, 10
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    record = []
    ddpm_sample(eps, (1, 3, 16, 16), steps=steps, x_T=x_T, generator=torch.Generator().manual_seed(3),
                guidance=DPSGuidance(op, Gaussian(0.05), y, zeta=zeta, rule="dps"),
                callback=lambda info: record.append(info["x"].clone()))
    # By hand: x'_{t-1} from the DDPM posterior, then minus zeta * grad_{x_t} ||y - A(x0_hat(x_t))||.
    sched = respace(alphas_cumprod_from_betas(linear_betas()), steps)
    t, ac, ac_prev, beta = int(sched.timesteps[-1]), float(sched.alphas_cumprod[-1]), \
        float(sched.alphas_cumprod[-2]), float(sched.betas[-1])
    x = x_T.clone().requires_grad_(True)
    x0_hat = ((x - math.sqrt(1 - ac) * eps(x, torch.tensor([t]))) / math.sqrt(ac)).clamp(-1, 1)
    norm = torch.linalg.norm(y - op(x0_hat))
    (grad,) = torch.autograd.grad(norm, x)
    z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3))
    mean = (math.sqrt(ac_prev) * beta * x0_hat + math.sqrt(1 - beta) * (1 - ac_prev) * x) / (1 - ac)
    x_prev = mean + math.sqrt(beta * (1 - ac_prev) / (1 - ac)) * z - zeta * grad
    torch.testing.assert_close(record[0], x_prev.detach(), rtol=1e-5, atol=1e-5)


def test_paper_rule_is_the_official_rule_with_twice_the_step():
    _, op, y = make_problem()
    x = torch.randn(2, 3, 16, 16)
    fn = lambda x_: 0.5 * x_  # noqa: E731
    official = DPSGuidance(op, Gaussian(0.05), y, zeta=1.0, rule="dps").evaluate(x, fn)
    paper = DPSGuidance(op, Gaussian(0.05), y, zeta=1.0, rule="dps_paper").evaluate(x, fn)
    torch.testing.assert_close(paper.grad, 2 * official.grad)


def test_gradient_is_per_sample():
    _, op, y = make_problem(batch=3)
    x = torch.randn(3, 3, 16, 16)
    fn = lambda x_: torch.tanh(x_)  # noqa: E731
    whole = DPSGuidance(op, Gaussian(0.05), y).evaluate(x, fn).grad
    single = DPSGuidance(op, Gaussian(0.05), y[1:2]).evaluate(x[1:2], fn).grad
    torch.testing.assert_close(whole[1:2], single)


def test_full_gradient_matches_closed_form():
    # x0_hat = c x, d = ||y - A c x||  =>  grad = -c A^T r / ||r||
    _, op, y = make_problem(batch=1)
    op = op.double()
    y = y.double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    c = 0.3
    g = DPSGuidance(op, Noiseless(), y).evaluate(x, lambda x_: c * x_).grad
    r = y - op(c * x)
    torch.testing.assert_close(g, -c * op.adjoint(r) / r.norm())


def test_x0_only_differentiates_wrt_x0_hat():
    _, op, y = make_problem(batch=1)
    x = torch.randn(1, 3, 16, 16)
    calls = []

    def fn(x_):
        calls.append(torch.is_grad_enabled())
        return 0.3 * x_
    res = DPSGuidance(op, Gaussian(0.05), y, mode="x0_only").evaluate(x, fn)  # grad w.r.t. x0_hat
    r = y - op(0.3 * x)
    torch.testing.assert_close(res.grad, -op.adjoint(r) / r.norm(), rtol=1e-4, atol=1e-6)
    assert calls == [False]  # the denoiser ran without building a graph


def test_works_under_inference_mode_and_leaks_no_graph():
    _, op, y = make_problem()
    with torch.inference_mode():
        x = torch.randn(2, 3, 16, 16)
        guidance = DPSGuidance(GaussianBlur(5, 1.0), Gaussian(0.05), torch.randn(2, 3, 16, 16))
        res = guidance.evaluate(x, lambda x_: 0.5 * x_)
    assert res.grad.abs().sum() > 0 and not res.grad.requires_grad and not res.x0_hat.requires_grad
    plain = torch.ones(2, requires_grad=True)  # ordinary autograd still works afterwards
    (plain * 2).sum().backward()
    assert torch.equal(plain.grad, torch.full((2,), 2.0))


def test_non_finite_gradient_raises_or_skips():
    y = torch.zeros(1, 3, 8, 8)
    bad = lambda x_: x_ * float("nan")  # noqa: E731
    with pytest.raises(GuidanceDivergedError, match="Lower zeta"):
        DPSGuidance(Inpainting(torch.zeros(8, 8)), Gaussian(0.05), y).evaluate(torch.randn(1, 3, 8, 8), bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = DPSGuidance(Inpainting(torch.zeros(8, 8)), Gaussian(0.05), y, on_nonfinite="skip").evaluate(
            torch.randn(1, 3, 8, 8), bad)
    assert torch.equal(res.grad, torch.zeros_like(res.grad)) and res.skipped
    assert any("unguided" in str(w.message) for w in caught)


def test_exploding_step_is_caught():
    g = DPSGuidance(Inpainting(torch.zeros(8, 8)), Gaussian(0.05), torch.zeros(1, 3, 8, 8), zeta=1e9)
    with pytest.raises(GuidanceDivergedError, match="diverged"):
        ddpm_sample(gaussian_prior_eps(), (1, 3, 8, 8), steps=5, guidance=g,
                    generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="nope"), "rule must be one of"), (dict(mode="nope"), "mode must be one of"),
    (dict(zeta=-1.0), "zeta"), (dict(start=0.8, end=0.2), "start <= end"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPSGuidance(SuperResolution(2), Gaussian(0.05), torch.zeros(1, 3, 8, 8), **kwargs)


def test_measurement_with_nan_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        DPSGuidance(SuperResolution(2), Gaussian(0.05), torch.full((1, 3, 8, 8), float("nan")))


def test_euler_calibrated_correction_moves_x_exactly_as_the_x_space_step():
    x0, op, y = make_problem(batch=2)
    denoiser = gaussian_prior_denoiser()
    sigmas = torch.tensor([2.0, 1.2, 0.0], dtype=torch.float64)
    x = 2.0 * torch.randn(2, 3, 16, 16)
    zeta = 0.4
    guided = euler_sample(denoiser, x, sigmas[:2], guidance=DPSGuidance(op, Gaussian(0.05), y, zeta=zeta, rule="dps"))
    plain = euler_sample(denoiser, x, sigmas[:2])
    grad = DPSGuidance(op, Gaussian(0.05), y).evaluate(x, lambda x_: denoiser(x_, x_.new_full((2,), 2.0))).grad
    torch.testing.assert_close(guided, plain - zeta * grad, rtol=1e-5, atol=1e-5)


def test_posterior_score_form_and_ddpm_schedule_size():
    g = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(denoised_correction(g, 2.0, None, "dps", 0.5), -0.5 * 4.0 * g)
    torch.testing.assert_close(denoised_correction(g, 2.0, 0.5, "schedule", 0.5), -0.5 * 4.0 * g)
    torch.testing.assert_close(denoised_correction(g, 2.0, 0.5, "dps", 0.5), -0.5 * 4.0 * g)
    assert ddpm_step_size("dps", 0.3, 0.02) == 0.3
    assert math.isclose(ddpm_step_size("schedule", 1.0, 0.02), 0.02 / math.sqrt(0.98))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "heun"])
@pytest.mark.parametrize("mode", ["full", "x0_only"])
@pytest.mark.parametrize("rule,zeta", [("schedule", 30.0), ("polyak", 1.0)])
def test_guidance_lowers_the_residual_in_every_sampler(sampler, mode, rule, zeta):
    x0, op, y = make_problem(batch=2, size=16)
    eps, den = gaussian_prior_eps(), gaussian_prior_denoiser()
    g = DPSGuidance(op, Gaussian(0.05), y, zeta=zeta, rule=rule, mode=mode)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    if sampler in ("ddpm", "ddim"):
        fn = ddpm_sample if sampler == "ddpm" else ddim_sample
        out_plain = fn(eps, (2, 3, 16, 16), steps=50, generator=gen())
        out = fn(eps, (2, 3, 16, 16), steps=50, generator=gen(), guidance=g)
    else:
        from dps.schedule import sigmas_karras
        sig = sigmas_karras(30, 0.02, 10.0)
        x = 10.0 * torch.randn(2, 3, 16, 16, generator=gen())
        fn = euler_sample if sampler == "euler" else heun_sample
        out_plain, out = fn(den, x, sig), fn(den, x, sig, guidance=g)
    d_plain = (op(out_plain) - y).flatten(1).norm(dim=1)
    d = (op(out) - y).flatten(1).norm(dim=1)
    assert (d < 0.8 * d_plain).all(), (d, d_plain)


def test_guidance_window_limits_the_steps():
    _, op, y = make_problem(batch=1)
    seen = []
    g = DPSGuidance(op, Gaussian(0.05), y, zeta=1.0, rule="dps", start=0.5, end=1.0)
    ddpm_sample(gaussian_prior_eps(), (1, 3, 16, 16), steps=10, guidance=g,
                generator=torch.Generator().manual_seed(0), callback=lambda i: seen.append(i["distance"] is not None))
    assert seen == [False] * 5 + [True] * 5


def test_tweedie_inverts_the_forward_process():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ac = 0.3
    x_t = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * eps
    torch.testing.assert_close(tweedie_x0(x_t, eps, ac), x0)
    # the DDPM posterior mean at x0 known exactly lies between x_t's signal and x0
    assert ddpm_posterior_step(x_t, x0, ac, 0.5, 1 - ac / 0.5, None).shape == x0.shape


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_x0_jacobian_matches_the_gaussian_prior_denoiser(alpha):
    from dps.guidance import x0_jacobian
    sigma, s_d = 0.8, 0.5
    # x = alpha x0 + sigma eps, x0 ~ N(0, s_d^2): E[x0|x] = alpha s_d^2 x / (alpha^2 s_d^2 + sigma^2)
    x = torch.randn(5, requires_grad=True)
    d = alpha * s_d**2 * x / (alpha**2 * s_d**2 + sigma**2)
    (jac,) = torch.autograd.grad(d.sum(), x)
    torch.testing.assert_close(jac, torch.full((5,), x0_jacobian(sigma, s_d, alpha)))


def test_posterior_score_form_for_flow_models_divides_by_alpha():
    g = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(denoised_correction(g, 0.5, None, "schedule", 1.0, alpha=0.5),
                               -(0.5**2 / 0.5) * g)
    # the Euler-calibrated form does not depend on alpha
    torch.testing.assert_close(denoised_correction(g, 0.5, 0.1, "dps", 1.0, alpha=0.5),
                               denoised_correction(g, 0.5, 0.1, "dps", 1.0))




def test_polyak_step_removes_the_stated_fraction_of_the_excess_residual():
    """To first order, x − εP lowers d by ε(d − d*), for any scale of A (Polyak's step to a known target)."""
    x0, op, _ = make_problem(batch=3, size=16)
    y = Gaussian(0.05).sample(op(x0), torch.Generator().manual_seed(1))
    x = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    eps = 1e-3
    directions = []
    for scale in (1.0, 10.0):
        g = DPSGuidance(op, Gaussian(0.05 * scale), y * scale, zeta=1.0, rule="polyak")
        g.operator = (lambda s: (lambda img: s * op(img)))(scale)
        result = g.evaluate(x, lambda x_: x_)
        p = g.step_gradient(result)
        floor = g.noise.expected_distance(g.y)
        d_after = g.distance(x - eps * p)
        torch.testing.assert_close((result.distance - d_after) / eps, result.distance - floor, rtol=2e-3, atol=0.0)
        directions.append(p)
    torch.testing.assert_close(directions[0], directions[1], rtol=1e-4, atol=1e-7)


def test_polyak_stops_at_the_noise_floor():
    x0, op, _ = make_problem(batch=1, size=16)
    g = DPSGuidance(op, Gaussian(0.05), op(x0), zeta=1.0, rule="polyak")
    result = g.evaluate(x0, lambda x_: x_)  # noiseless y: d = 0 < d* = σ√m
    assert torch.count_nonzero(g.step_gradient(result)) == 0


def test_polyak_rate_form_and_ddpm_size():
    p = torch.ones(1, 1, 2, 2)
    # The σ-space correction does not depend on the step: an Euler step removes ζΔσ/σ of the excess.
    for delta in (None, 0.1, 1.0):
        torch.testing.assert_close(denoised_correction(p, 2.0, delta, "polyak", 0.7), -0.7 * p)
    betas = linear_betas()
    ac = alphas_cumprod_from_betas(betas)
    t = 500
    sigma = math.sqrt((1 - ac[t]) / ac[t])
    sigma_prev = math.sqrt((1 - ac[t - 1]) / ac[t - 1])
    assert math.isclose(ddpm_step_size("polyak", 0.7, float(betas[t]), float(ac[t])),
                        0.7 * (1 - sigma_prev / sigma), rel_tol=1e-4)
    with pytest.raises(ValueError, match="alpha_cumprod"):
        ddpm_step_size("polyak", 0.7, 0.02)


def test_polyak_trust_region_bounds_the_step():
    x0, op, y = make_problem(batch=2, size=16)
    g = DPSGuidance(op, Noiseless(), y, zeta=2.0, rule="polyak")
    result = g.evaluate(torch.zeros_like(x0), lambda x_: x_)
    free = g.step_gradient(result)
    limit = torch.tensor([1e-3, 1e6])
    capped = g.step_gradient(result, limit=limit)
    step_rms = (g.zeta * capped).flatten(1).square().mean(1).sqrt()
    assert step_rms[0] <= 1e-3 * (1 + 1e-5) and step_rms[0] > 0
    torch.testing.assert_close(capped[1], free[1])  # a loose bound changes nothing


@pytest.mark.parametrize("scale", [0.0, 1e-25, 1e-45])
def test_polyak_with_a_tiny_or_zero_gradient_is_finite_and_bounded(scale):
    """A decoder that hardly responds (random VAE weights) gives ‖g‖ ≈ 0: the step stays finite and inside the
    trust region (it used to be inf·0 = NaN)."""
    from dps.guidance import GuidanceResult
    x0, op, y = make_problem(batch=2, size=16)
    g = DPSGuidance(op, Gaussian(0.05), y, zeta=1.0, rule="polyak")
    result = GuidanceResult(x0, torch.tensor([10.0, 10.0]), torch.full_like(x0, scale))
    limit = torch.tensor([0.5, 0.5])
    step = g.step_gradient(result, limit=limit)
    assert torch.isfinite(step).all()
    assert (step.flatten(1).square().mean(1).sqrt() <= 0.5 * (1 + 1e-5)).all()
    if scale == 0.0:
        assert torch.count_nonzero(step) == 0


class _MemoryHungryDenoiser:
    """Runs out of memory whenever it is differentiated (as the SDXL UNet's backward at 1024 px does on a
    12-16 GB card); counts the calls made with a graph."""

    def __init__(self) -> None:
        self.graph_calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            self.graph_calls += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return 0.8 * x


def test_out_of_memory_through_the_denoiser_falls_back_to_x0_only_and_says_so():
    x0, op, y = make_problem()
    x = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    hungry = _MemoryHungryDenoiser()
    guidance = DPSGuidance(op, Gaussian(0.05), y, rule="dps", mode="full", fallback_on_oom=True)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        first = guidance.evaluate(x, hungry)
    reference = DPSGuidance(op, Gaussian(0.05), y, rule="dps", mode="x0_only").evaluate(x, hungry)
    torch.testing.assert_close(first.grad, reference.grad)
    torch.testing.assert_close(first.distance, reference.distance)
    assert guidance.mode == "x0_only" and len(guidance.notes) == 1 and "x0_only" in guidance.notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # said once, not at every step
        guidance.evaluate(x, hungry)
    assert hungry.graph_calls == 1                   # the later steps do not try the full gradient again


def test_out_of_memory_is_raised_without_the_fallback():
    x0, op, y = make_problem()
    guidance = DPSGuidance(op, Gaussian(0.05), y, rule="dps", mode="full")
    with pytest.raises(torch.OutOfMemoryError):
        guidance.evaluate(x0, _MemoryHungryDenoiser())
    assert guidance.mode == "full" and not guidance.notes
