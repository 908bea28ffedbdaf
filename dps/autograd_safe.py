"""Host tensors made autograd-safe, in one place.

Hosts (ComfyUI, Forge) load weights and run prompts under ``torch.inference_mode()``. Tensors made there are
*inference tensors*: autograd cannot save them for backward, so a gradient through a network, a decoder or an
operator that touches one fails. Guidance needs such gradients; these helpers give it ordinary tensors, copying
only what is an inference tensor, once, and never keeping a weight gradient.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn


def autograd_safe(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a normal copy when ``t`` is an inference tensor used outside inference mode (inside it no
    backward can run, so nothing needs copying). Measurements and operator buffers are small: the copy is cheap."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return t.clone()
    return t


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` that autograd may save, made outside inference mode whatever mode the caller is in
    (for tensors a host hands over once and guidance keeps: the measurement, σ)."""
    with torch.inference_mode(False):
        return t.detach().clone()


def needs_autograd_fix(modules: Iterable[nn.Module | None]) -> bool:
    """Whether any parameter or buffer of ``modules`` is an inference tensor."""
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_inference():
                return True
    return False


def make_autograd_safe(modules: Iterable[nn.Module | None]) -> int:
    """Replace inference-tensor parameters and buffers of ``modules`` by normal copies, in place.

    Copies are made outside inference mode, once (already normal tensors are skipped), with
    ``requires_grad=False`` so no weight gradient is kept; later inference runs use the normal tensors unchanged.
    For modules the host owns and keeps using (ComfyUI's UNet, ControlNets, VAE). Returns the number replaced.
    """
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for module in modules:
            if module is None:
                continue
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None and p.is_inference():
                        sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                        replaced += 1
                for name, b in list(sub._buffers.items()):
                    if b is not None and b.is_inference():
                        sub._buffers[name] = b.clone()
                        replaced += 1
    return replaced


def autograd_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` built outside inference mode, so its parameters are ordinary tensors.
    For modules the host must keep untouched (Forge shares its VAE module between jobs); only input gradients
    are needed, so parameters do not require grad."""
    with torch.inference_mode(False):
        clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone
