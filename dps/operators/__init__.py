"""Forward models ``A`` for inverse problems, as differentiable torch modules on NCHW batches in [-1, 1].

Each operator module also declares its ``OperatorSpec``s (``dps.operators.spec``): what hosts show and build;
``dps.operators.registry`` lists them.
"""

from .base import LinearOperator, Operator, batch_dot, conjugate_gradient_pinv
from .blur import Blur, GaussianBlur, MotionBlur, gaussian_kernel, motion_kernel
from .masking import Inpainting, box_mask, random_mask
from .resample import SuperResolution
from .simple import Compose, Grayscale, PhaseRetrieval
from .spec import OperatorSpec, Param, Task
from . import registry

__all__ = [
    "Operator", "LinearOperator", "batch_dot", "conjugate_gradient_pinv",
    "SuperResolution", "Inpainting", "box_mask", "random_mask",
    "Blur", "GaussianBlur", "MotionBlur", "gaussian_kernel", "motion_kernel",
    "PhaseRetrieval", "Grayscale", "Compose",
    "OperatorSpec", "Param", "Task", "registry",
]
