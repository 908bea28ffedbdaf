import pytest
import torch

from dps.noise import Gaussian, Noiseless, Poisson


def test_gaussian_is_seeded_and_has_the_stated_std():
    clean = torch.zeros(4, 3, 64, 64)
    a = Gaussian(0.05).sample(clean, torch.Generator().manual_seed(0))
    b = Gaussian(0.05).sample(clean, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert abs(float(a.std()) - 0.05) < 0.002


def test_gaussian_distance_is_the_per_sample_norm():
    y, ax = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    d = Gaussian(0.1).distance(y, ax)
    torch.testing.assert_close(d, torch.stack([(y[i] - ax[i]).norm() for i in range(3)]))


def test_poisson_sample_is_unbiased_and_residual_finite_at_zero():
    clean = torch.full((1, 1, 128, 128), 0.0)  # u = 0.5
    noise = Poisson(rate=0.1)
    y = noise.sample(clean, torch.Generator().manual_seed(0))
    assert abs(float(y.mean())) < 0.02
    dark = torch.full((1, 1, 8, 8), -1.0)  # zero photons
    ax = torch.zeros(1, 1, 8, 8, requires_grad=True)
    d = noise.distance(noise.sample(dark, torch.Generator().manual_seed(1)), ax)
    (g,) = torch.autograd.grad(d.sum(), ax)
    assert torch.isfinite(d).all() and torch.isfinite(g).all()


def test_poisson_weights_favour_dark_pixels():
    noise = Poisson(rate=1.0)
    y = torch.tensor([[[[-1.0, 1.0]]]])
    ax = y + 0.1
    r = noise.residual(y, ax).abs().flatten()
    assert r[0] > r[1]  # the dark pixel has the smaller variance, so its error weighs more


def test_noiseless_returns_a_copy():
    x = torch.randn(2, 3, 4, 4)
    y = Noiseless().sample(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("make,match", [(lambda: Gaussian(-0.1), "sigma must be >= 0"),
                                        (lambda: Poisson(0.0), "rate must be > 0")])
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_distance_rejects_mismatched_measurement():
    with pytest.raises(ValueError, match="same operator and image size"):
        Gaussian(0.1).distance(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("noise", [Gaussian(0.05), Poisson(rate=0.5), Poisson(rate=4.0)],
                         ids=["gaussian", "poisson-0.5", "poisson-4"])
def test_expected_distance_is_the_residual_at_the_truth(noise):
    """The noise floor ``d*`` the "polyak" rule aims at: ‖residual(y, A x0)‖ of real draws, within 5 % on
    average over 8 draws (the Poisson estimate, which reads the rate off the counts, is ~3 % low at rate 0.5)."""
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(4, 3, 32, 32, generator=g) * 1.6 - 0.8
    ratios = []
    for seed in range(8):
        y = noise.sample(clean, torch.Generator().manual_seed(5 + seed))
        expected = noise.expected_distance(y)
        assert expected.shape == (4,)
        ratios.append(noise.distance(y, clean) / expected)
    torch.testing.assert_close(torch.stack(ratios).mean(0), torch.ones(4), rtol=0.0, atol=0.05)


def test_noiseless_floor_is_zero():
    assert torch.equal(Noiseless().expected_distance(torch.randn(2, 3, 4, 4)), torch.zeros(2))
