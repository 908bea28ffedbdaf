"""The operator contract shared by every forward model ``A``.

Images are NCHW batches in the project's one image range, [-1, 1] (the paper's: the official DPS code's
``sample_condition.py`` normalises with ``Normalize((0.5,)*3, (0.5,)*3)``; stated once in ``dps/__init__.py``). Operators act on each sample independently: nothing couples the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..autograd_safe import autograd_safe  # noqa: F401  (the operators' buffers under a host's inference mode)
from ..validate import check_tensor


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product <a, b>, shape (B,)."""
    return (a * b).flatten(1).sum(dim=1)


def check_image(x: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is an NCHW floating batch (``TypeError`` unless it is a tensor)."""
    check_tensor(name, x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be an NCHW batch (4 dimensions), got shape {tuple(x.shape)}; "
                         "add a batch dimension with x[None] or convert HWC images with x.permute(2, 0, 1)")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}; convert with x.float() / 127.5 - 1")


class Operator(nn.Module):
    """A forward model ``y = A(x)``; subclasses implement ``forward``.

    ``linear`` tells guidance and baselines whether ``adjoint`` and ``pseudo_inverse`` exist.
    """

    linear: bool = False

    def measurement_shape(self, image_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``A(x)`` for an image of ``image_shape`` (runs ``A`` once on zeros, without grad)."""
        first = next(iter(self.buffers()), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        device = first.device if first is not None else torch.device("cpu")
        with torch.no_grad():
            return tuple(self.forward(torch.zeros(tuple(image_shape), dtype=dtype, device=device)).shape)

    def check_measurement(self, y: torch.Tensor, image_shape: torch.Size | tuple[int, ...]) -> None:
        """Raise ``ValueError`` naming the fix if ``y`` cannot be ``A(x)`` for an image of ``image_shape``."""
        expected = self.measurement_shape(image_shape)
        if tuple(y.shape[1:]) != expected[1:] or y.shape[0] not in (1, expected[0]):
            raise ValueError(
                f"measurement of shape {tuple(y.shape)} does not fit {type(self).__name__} on images of shape "
                f"{tuple(image_shape)}: A(x) has shape {expected}. Resize the measurement to "
                f"{expected[-2]}x{expected[-1]} or change the image size / operator parameters")


class LinearOperator(Operator):
    """A linear ``A`` with its true adjoint and a pseudo-inverse.

    The default ``pseudo_inverse`` is a least-squares solve: conjugate gradients on the normal
    equations ``AᵀA x = Aᵀy`` from ``x = 0``. Started at zero, every iterate lies in the range of
    ``Aᵀ``, so the limit is the minimum-norm least-squares solution ``A⁺y``; stopping after
    ``iterations`` steps regularises ill-conditioned problems (blur). Subclasses with a closed form
    override it.
    """

    linear = True

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pseudo_inverse(self, y: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
        return conjugate_gradient_pinv(self, y, iterations=iterations, tol=tol)


def conjugate_gradient_pinv(op: LinearOperator, y: torch.Tensor, iterations: int = 100,
                            tol: float = 1e-6) -> torch.Tensor:
    """Minimum-norm least-squares ``x`` with ``A x ≈ y`` by CG on ``AᵀA x = Aᵀy``, per sample."""
    b = op.adjoint(y)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = batch_dot(r, r)
    b_norm = rs.sqrt().clamp_min(torch.finfo(b.dtype).tiny)
    view = (-1,) + (1,) * (b.ndim - 1)
    for _ in range(iterations):
        ap = op.adjoint(op(p))
        denom = batch_dot(p, ap)
        alpha = torch.where(denom > 0, rs / denom.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(rs))
        x = x + alpha.view(view) * p
        r = r - alpha.view(view) * ap
        rs_new = batch_dot(r, r)
        if bool((rs_new.sqrt() <= tol * b_norm).all()):
            break
        p = r + (rs_new / rs.clamp_min(torch.finfo(b.dtype).tiny)).view(view) * p
        rs = rs_new
    return x
