import pytest
import torch

from dps.operators import (Compose, GaussianBlur, Grayscale, Inpainting, MotionBlur, PhaseRetrieval,
                           SuperResolution, box_mask, conjugate_gradient_pinv, random_mask)

LINEAR = [
    pytest.param(lambda h, w: SuperResolution(4), id="sr4-bicubic"),
    pytest.param(lambda h, w: SuperResolution(2, "bilinear"), id="sr2-bilinear"),
    pytest.param(lambda h, w: SuperResolution(4, "area"), id="sr4-area"),
    pytest.param(lambda h, w: GaussianBlur(9, 2.0), id="gauss-blur"),
    pytest.param(lambda h, w: MotionBlur(11, 0.5, seed=3), id="motion-blur"),
    pytest.param(lambda h, w: Inpainting(box_mask(h, w, generator=torch.Generator().manual_seed(0))), id="box"),
    pytest.param(lambda h, w: Inpainting(random_mask(h, w, 0.5, torch.Generator().manual_seed(0))), id="random"),
    pytest.param(lambda h, w: Grayscale(), id="grayscale"),
    pytest.param(lambda h, w: Compose(GaussianBlur(5, 1.0), SuperResolution(2)), id="blur-then-sr"),
]
SHAPES = [(1, 3, 16, 16), (3, 3, 32, 24), (2, 3, 40, 40)]


@pytest.mark.parametrize("factory", LINEAR)
@pytest.mark.parametrize("shape", SHAPES)
def test_adjoint_dot_product(factory, shape):
    op = factory(*shape[-2:]).double()
    x = torch.randn(shape, dtype=torch.float64)
    y = op(x)
    v = torch.randn_like(y)
    lhs, rhs = (y * v).sum(), (x * op.adjoint(v)).sum()
    assert abs(float(lhs - rhs)) / abs(float(lhs)) < 1e-5


@pytest.mark.parametrize("factory", LINEAR)
def test_adjoint_matches_autograd(factory):
    op = factory(16, 16).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    y = op(x)
    v = torch.randn_like(y)
    (vjp,) = torch.autograd.grad((y * v).sum(), x)
    torch.testing.assert_close(op.adjoint(v), vjp)


@pytest.mark.parametrize("factory", LINEAR)
def test_pseudo_inverse_reproduces_measurement(factory):
    op = factory(32, 32).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = op(x)
    rel = float((op(op.pseudo_inverse(y)) - y).norm() / y.norm())
    assert rel < (0.05 if isinstance(op, (GaussianBlur, MotionBlur, Compose)) else 1e-8)


def test_closed_form_pseudo_inverse_is_the_minimum_norm_solution():
    # CG on the normal equations from zero converges to the minimum-norm least-squares solution
    for op in [SuperResolution(4).double(), Grayscale().double()]:
        y = op(torch.randn(1, 3, 32, 32, dtype=torch.float64)) + 0.1 * torch.randn(op(torch.zeros(1, 3, 32, 32, dtype=torch.float64)).shape, dtype=torch.float64)
        closed = op.pseudo_inverse(y)
        generic = conjugate_gradient_pinv(op, y, iterations=500, tol=1e-13)
        torch.testing.assert_close(closed, generic, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("op,shape,expected", [
    (SuperResolution(4), (2, 3, 32, 32), (2, 3, 8, 8)),
    (GaussianBlur(61, 3.0), (1, 3, 64, 64), (1, 3, 64, 64)),
    (PhaseRetrieval(2.0), (1, 3, 256, 256), (1, 3, 384, 384)),
    (Grayscale(), (2, 3, 8, 8), (2, 1, 8, 8)),
    (Compose(GaussianBlur(5, 1.0), SuperResolution(2)), (1, 3, 16, 16), (1, 3, 8, 8)),
])
def test_output_shapes(op, shape, expected):
    assert tuple(op(torch.randn(shape)).shape) == expected
    assert op.measurement_shape(shape) == expected


def test_operators_act_per_sample():
    x = torch.randn(3, 3, 32, 32)
    for op in [SuperResolution(4), GaussianBlur(9, 2.0), MotionBlur(9), PhaseRetrieval(), Grayscale()]:
        torch.testing.assert_close(op(x)[1:2], op(x[1:2]))


def test_dtype_kept():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(1, 3, 16, 16, dtype=dtype)
        for op in [SuperResolution(2), GaussianBlur(5, 1.0), PhaseRetrieval(), Grayscale()]:
            assert op(x).dtype == dtype


def test_seeded_determinism():
    torch.testing.assert_close(MotionBlur(31, 0.5, seed=7).kernel, MotionBlur(31, 0.5, seed=7).kernel)
    assert not torch.equal(MotionBlur(31, 0.5, seed=7).kernel, MotionBlur(31, 0.5, seed=8).kernel)
    m1 = random_mask(32, 32, 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(m1, random_mask(32, 32, 0.4, torch.Generator().manual_seed(1)))
    assert int(m1.sum()) == int(0.4 * 32 * 32)
    b = box_mask(256, 256, generator=torch.Generator().manual_seed(2))
    rows, cols = b[0, 0].nonzero(as_tuple=True)
    assert int(b.sum()) == 128 * 128 and rows.min() >= 16 and rows.max() < 256 - 16 and cols.min() >= 16


def test_motion_kernel_is_normalised_and_user_kernel_accepted():
    k = MotionBlur(61, 0.5, seed=0).kernel
    assert k.shape == (61, 61) and abs(float(k.sum()) - 1) < 1e-5 and float(k.min()) >= 0
    user = torch.zeros(5, 5)
    user[2, 1:4] = 2.0
    op = MotionBlur(kernel=user)
    torch.testing.assert_close(op.kernel.sum(), torch.tensor(1.0))


def test_phase_retrieval_is_amplitude_of_orthonormal_fft():
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    y = PhaseRetrieval(0.0)(x)
    # Parseval for the orthonormal transform: energies agree
    torch.testing.assert_close(y.square().sum(), x.square().sum())
    assert PhaseRetrieval(2.0).padding(256, 256) == (64, 64)


@pytest.mark.parametrize("make,match", [
    (lambda: Inpainting(torch.zeros(1, 1, 8, 8))(torch.zeros(1, 3, 16, 16)), "resize the mask"),
    (lambda: SuperResolution(4)(torch.zeros(1, 3, 30, 32)), "not divisible"),
    (lambda: SuperResolution(0), "positive integer"),
    (lambda: GaussianBlur(61, -1.0), "sigma must be positive"),
    (lambda: GaussianBlur(60, 3.0), "odd"),
    (lambda: GaussianBlur(61, 3.0)(torch.zeros(1, 3, 20, 20)), "too small"),
    (lambda: Inpainting(torch.full((8, 8), 2.0)), r"\[0, 1\]"),
    (lambda: Grayscale()(torch.zeros(1, 1, 8, 8)), "RGB"),
    (lambda: SuperResolution(4).check_measurement(torch.zeros(1, 3, 10, 10), (1, 3, 32, 32)), "Resize the measurement"),
    (lambda: SuperResolution(4)(torch.zeros(3, 32, 32)), "NCHW"),
    (lambda: box_mask(16, 16, box=(16, 16)), "does not fit"),
])
def test_bad_input_names_the_fix(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_operators_usable_for_autograd_after_inference_mode_construction():
    with torch.inference_mode():
        ops = [GaussianBlur(5, 1.0), Inpainting(torch.zeros(1, 1, 8, 8)), Grayscale(), SuperResolution(2)]
        for op in ops:  # first use inside inference mode fills caches with inference tensors
            op(torch.zeros(1, 3, 8, 8))
    for op in ops:
        x = torch.randn(1, 3, 8, 8, requires_grad=True)
        (g,) = torch.autograd.grad(op(x).square().sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
