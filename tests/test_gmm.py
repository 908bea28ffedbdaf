"""The Gaussian-mixture benchmark (MCG-Diff protocol): DPS against the exact posterior."""

import pytest
import torch

from dps import DPSGuidance, Gaussian, alphas_cumprod_from_betas, ddpm_sample, linear_betas
from dps.app import GaussianMixture, MatrixOperator, as_image, random_problem, sliced_wasserstein

AC = alphas_cumprod_from_betas(linear_betas())


def problem(dim_x, dim_y, seed, sigma_y=0.5):
    g = torch.Generator().manual_seed(seed)
    prior = GaussianMixture.mcg_diff(dim_x, g)
    a = random_problem(dim_x, dim_y, g)
    x_star = prior.sample(1, g)[0]
    y = a @ x_star + sigma_y * torch.randn(dim_y, generator=g, dtype=torch.float64)
    return prior, a, y, sigma_y


def test_exact_posterior_matches_bayes_rule_by_importance_weights():
    prior, a, y, s = problem(8, 2, 0)
    post = prior.posterior(a, y, s)
    x = prior.sample(200_000, torch.Generator().manual_seed(1))
    logw = -0.5 * ((x @ a.T - y).square().sum(1)) / s**2
    w = (logw - logw.logsumexp(0)).exp()
    torch.testing.assert_close((w[:, None] * x).sum(0), (post.weights[:, None] * post.means).sum(0),
                               atol=0.3, rtol=0.05)


def test_unconditional_sampler_reaches_the_prior():
    prior, a, y, s = problem(8, 2, 0)
    xs = ddpm_sample(prior.eps_model(AC), (1000, 8, 1, 1), steps=100, clip_x0=False,
                     generator=torch.Generator().manual_seed(0))
    ref = prior.sample(1000, torch.Generator().manual_seed(1))
    exact = prior.posterior(a, y, s).sample(1000, torch.Generator().manual_seed(1))
    sw = lambda u, v: sliced_wasserstein(u.flatten(1).double(), v, 1000, torch.Generator().manual_seed(0))  # noqa
    assert sw(xs, ref) < 0.15 * sw(exact, ref)


# DPS is known to mis-weight modes when a single measurement leaves several plausible (MCG-Diff, benchopt
# run in the notes: DPS max-SW 23-29 at d_y = 1), so the bar is lower there.
@pytest.mark.parametrize("dim_y,max_ratio", [(1, 0.8), (2, 0.25), (4, 0.25)])
def test_dps_is_much_closer_to_the_exact_posterior_than_unconditional(dim_y, max_ratio):
    sw_dps, sw_uncond = [], []
    for seed in range(3):
        prior, a, y, s = problem(8, dim_y, seed)
        exact = prior.posterior(a, y, s).sample(1000, torch.Generator().manual_seed(1))
        eps = prior.eps_model(AC)
        distances = []
        guidance = DPSGuidance(MatrixOperator(a), Gaussian(s), as_image(y[None]), zeta=2.0, rule="schedule")
        dps = ddpm_sample(eps, (1000, 8, 1, 1), steps=100, clip_x0=False, guidance=guidance,
                          generator=torch.Generator().manual_seed(0),
                          callback=lambda info: distances.append(float(info["distance"].mean())))
        uncond = ddpm_sample(eps, (1000, 8, 1, 1), steps=100, clip_x0=False,
                             generator=torch.Generator().manual_seed(0))
        sw_dps.append(sliced_wasserstein(dps.flatten(1).double(), exact, 1000, torch.Generator().manual_seed(2)))
        sw_uncond.append(sliced_wasserstein(uncond.flatten(1).double(), exact, 1000,
                                            torch.Generator().manual_seed(2)))
        # the measurement residual falls along the trajectory, down to the noise level
        assert sum(distances[-10:]) < sum(distances[:10]), distances
        assert distances[-1] < 2 * s * dim_y**0.5, distances
    assert sum(sw_dps) < max_ratio * sum(sw_uncond), (sw_dps, sw_uncond)
