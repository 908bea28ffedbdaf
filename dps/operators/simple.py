"""Small operators: phase retrieval, grayscale (colourisation) and composition."""

from __future__ import annotations

import torch
from torch import nn

from ..validate import check_number
from .base import LinearOperator, Operator, autograd_safe, check_image
from .spec import OperatorSpec, Param, Task


class PhaseRetrieval(Operator):
    """``y = |F(pad(x))|``: amplitude of the centred orthonormal 2-D FFT of the zero-padded image.

    As the official code: ``pad = int(oversample / 8 * side)`` zeros on each side (64 px at 256 for
    the paper's ``oversample = 2.0``), centred FFT with ``norm="ortho"``, the amplitude (not squared).
    Non-linear: no adjoint; autograd differentiates it (the gradient of |z| at z = 0 is 0 in torch).
    """

    MAX_OVERSAMPLE = 8.0

    def __init__(self, oversample: float = 2.0) -> None:
        super().__init__()
        # Refused before anything is allocated: the padded spectrum has (1 + oversample/4)² times the image's
        # pixels. 4 already doubles each side (the oversampling phase retrieval needs); 8 triples it.
        self.oversample = check_number("oversample", oversample, minimum=0, maximum=self.MAX_OVERSAMPLE,
                                       fix="the paper uses 2.0; more than 8 pads the image past three times its side")

    def padding(self, h: int, w: int) -> tuple[int, int]:
        return int(self.oversample / 8 * h), int(self.oversample / 8 * w)

    def image_size(self, measurement_h: int, measurement_w: int) -> tuple[int, int]:
        """The (H, W) whose padded spectrum has the measurement's size; ValueError if there is none."""
        def side(m: int) -> int:
            for n in range(1, m + 1):
                if n + 2 * int(self.oversample / 8 * n) == m:
                    return n
            raise ValueError(f"{measurement_h}x{measurement_w} cannot be a phase-retrieval measurement with "
                             f"oversample {self.oversample} (its side is n + 2*int(oversample/8*n))")
        return side(measurement_h), side(measurement_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        ph, pw = self.padding(*x.shape[-2:])
        z = nn.functional.pad(x, (pw, pw, ph, ph))
        if z.dtype in (torch.float16, torch.bfloat16):  # torch's FFT needs float32 or wider
            z = z.float()
        spectrum = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(z, dim=(-2, -1)), norm="ortho"),
                                      dim=(-2, -1))
        return spectrum.abs().to(x.dtype)


class Grayscale(LinearOperator):
    """``y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601 luma), one channel out; colourisation.

    The pseudo-inverse ``w y / ‖w‖²`` is exact (A has full row rank).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor([0.299, 0.587, 0.114]))

    def _w(self, like: torch.Tensor) -> torch.Tensor:
        return autograd_safe(self.weights).to(device=like.device, dtype=like.dtype).view(1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        if x.shape[1] != 3:
            raise ValueError(f"grayscale needs RGB images (3 channels), got {x.shape[1]}")
        return (self._w(x) * x).sum(dim=1, keepdim=True)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        check_image(y, "y")
        return self._w(y) * y

    def pseudo_inverse(self, y: torch.Tensor, iterations: int = 0, tol: float = 0.0) -> torch.Tensor:
        w = self._w(y)
        return w * y / (w * w).sum()


class Compose(Operator):
    """``A = A_n ∘ … ∘ A_1``: the operators are applied in the order given (e.g. blur, then downsample).

    Linear when every part is; then ``adjoint`` applies the adjoints in reverse order and
    ``pseudo_inverse`` is the least-squares solve of ``LinearOperator``.
    """

    def __init__(self, *ops: Operator) -> None:
        super().__init__()
        if not ops or not all(isinstance(op, Operator) for op in ops):
            raise ValueError("Compose needs one or more dps operators, e.g. Compose(GaussianBlur(), SuperResolution(4))")
        self.ops = nn.ModuleList(ops)
        self.linear = all(op.linear for op in ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = op(x)
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not self.linear:
            raise TypeError("this composition contains a non-linear operator and has no adjoint")
        for op in reversed(self.ops):
            y = op.adjoint(y)
        return y

    def pseudo_inverse(self, y: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
        if not self.linear:
            raise TypeError("this composition contains a non-linear operator and has no pseudo-inverse")
        return LinearOperator.pseudo_inverse(self, y, iterations=iterations, tol=tol)  # type: ignore[arg-type]


SPECS = (
    OperatorSpec(
        name="phase_retrieval", display_name="Phase Retrieval", order=60, experimental=True,
        description="Recover a picture from the magnitude of its Fourier transform (a research task; results vary "
                    "from run to run).",
        measurement="the amplitudes |F(x)| of the zero-padded picture's spectrum, not a picture",
        params=(Param("oversample", "float", default=2.0, min=0.0, max=8.0, step=0.5, label="Phase retrieval oversampling",
                      help="Zero padding before the Fourier transform: oversample/8 of the image side on each side "
                           "(the paper: 2, a 256 px image padded to 384 px)."),),
        factory=PhaseRetrieval,
        aliases=("fourier", "fft", "spectrum", "diffraction", "phase"),
        from_picture=None,
        measurement_size=lambda h, w, oversample, **_: tuple(
            n + 2 * p for n, p in zip((h, w), PhaseRetrieval(oversample).padding(h, w))),
        image_size=lambda h, w, oversample, **_: PhaseRetrieval(oversample).image_size(h, w),
    ),
    OperatorSpec(
        name="grayscale", display_name="Grayscale", order=50,
        description="Colourise a black-and-white picture, or keep a sketch's tones while the model adds colour.",
        measurement="the picture's luma (BT.601), one channel, at full size",
        params=(), factory=Grayscale,
        aliases=("colorize", "colourise", "colorization", "black and white", "monochrome", "sketch", "restore"),
        from_picture="apply",
        tasks=(Task("colorization", demo=False),),   # not in the demo: its digits are gray already
    ),
)
