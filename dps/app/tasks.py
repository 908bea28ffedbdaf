"""The restoration tasks of the demo, the command line and the benchmarks, with their operators.

Parameters follow the paper's (Chung et al. 2023, official configs at 256 px) scaled to the image side
``s``: super-resolution x4 (bicubic); a box of half the side with a margin of s/16; 70 % of pixels missing
at random (the top of the official 30-70 % range); Gaussian blur σ = max(1.5, 3·s/256) px; motion blur of
side max(9, 61·s/256) px with intensity 0.5; phase retrieval with oversampling 2.
"""

from __future__ import annotations

import math

import torch

from ..operators import (GaussianBlur, Inpainting, MotionBlur, Operator, PhaseRetrieval, SuperResolution, box_mask,
                        random_mask)

TASKS = ("super_resolution", "box_inpainting", "random_inpainting", "gaussian_deblur", "motion_deblur",
         "phase_retrieval")


def _odd(n: float) -> int:
    n = int(round(n))
    return n if n % 2 else n + 1


def make_operator(task: str, shape: tuple[int, ...], seed: int = 0, factor: int = 4,
                  fraction: float = 0.7) -> Operator:
    """The operator of ``task`` for a batch of ``shape`` (B, C, H, W); masks differ per image, seeded."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    b, _, h, w = shape
    side = min(h, w)
    g = torch.Generator().manual_seed(seed)
    if task == "super_resolution":
        return SuperResolution(factor)
    if task == "box_inpainting":
        return Inpainting(torch.cat([box_mask(h, w, generator=g) for _ in range(b)]))
    if task == "random_inpainting":
        return Inpainting(torch.cat([random_mask(h, w, fraction, generator=g) for _ in range(b)]))
    if task == "gaussian_deblur":
        sigma = max(1.5, 3.0 * side / 256)
        return GaussianBlur(min(_odd(2 * math.ceil(3 * sigma) + 1), _odd(2 * side - 3)), sigma)
    if task == "motion_deblur":
        return MotionBlur(min(_odd(max(9, 61 * side / 256)), _odd(2 * side - 3)), 0.5, seed=seed)
    return PhaseRetrieval(2.0)
