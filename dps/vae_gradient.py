"""Memory-bounded gradients through a latent decoder (a VAE's, or TAESD's).

DPS differentiates ``d = ‖y − A(D(x0_hat))‖`` through the decoder ``D``. With ``v = ∂d/∂image`` (cheap: the
operator and the norm act on the decoded image) the latent gradient is the vector-Jacobian product
``g = J_D(x0_hat)ᵀ v`` (chain rule), and only that product needs the decoder's activations. A plain backward
pass keeps all of them: for the SD1.x/SDXL KL decoder in float32 about 6 GB at 512 px and 24 GB at 1024 px
(``bench/real_scale.py``). The modes here compute the same ``g`` within a memory bound:

* ``"full"``: one backward pass through the whole decoder (the reference).
* ``"checkpointed"``: activation checkpointing (Chen et al. 2016, *Training deep nets with sublinear memory
  cost*, arXiv 1604.06174) of the decoder's residual, attention and upsampling blocks: only each block's input
  is kept and its inside is recomputed during the backward pass. Exact (the same arithmetic), one extra
  forward pass of the decoder.
* ``"tiled"``: the image is cut into tiles of ``tile`` latent pixels; for each tile the latent is cropped with
  ``overlap`` latent pixels of context on every side, decoded with grad, and ``⟨D(crop)|tile, v|tile⟩`` is
  backpropagated into the crop. Since the tiles partition the image, ``Σ_tiles J_tileᵀ v_tile = J_Dᵀ v`` exactly
  when each crop decodes its tile as the whole latent does. For the KL decoder of SD/SDXL/SD3/FLUX the
  low-resolution trunk (conv_in and the mid block, whose self-attention sees the whole latent) runs once on
  the whole latent with grad and only the upsampling head is tiled (``trunk_tiled_vjp``), so the attention's
  gradient is exact. What stays approximate: the head's receptive field reaching beyond the overlap, and its
  GroupNorms, which normalise a crop with the crop's own statistics (as ComfyUI's tiled VAE decode does) and
  keep their gradient through the statistics inside the crop. Normalising the crops with the whole image's
  statistics and adding the gradient through them by the chain rule, pass after pass (pass k: the paths through
  k − 1 statistics), is exact in the limit but on ComfyUI's KL decoder (random weights) the passes do not decay
  until the chain's depth (cosine 0.67, 0.20, 0.19 after 1-3 passes, 0.96 after 12, 1.0 after 20:
  ``bench/README.md``), so tiles keep the crops' own statistics.
  ``v`` itself always comes from one no-grad decode of the whole latent, so the residual and its norm are
  exact. Measured agreement with "full": ``bench/real_scale.py --check`` (``bench/README.md``).
* ``"auto"``: ``"full"`` when its estimated memory takes at most ``FULL_SHARE`` of the budget, else
  ``"checkpointed"`` when that fits, else ``"tiled"`` with the largest tile that fits (``plan``). Checkpointing
  is exact and costs one more decoder forward pass (1.7 % of a whole guided SD1.5 step at 512 px on CPU, while
  the step's peak memory fell from 1.61x to 1.29x the unguided step's, ``bench/README.md``), so ``"full"`` is
  kept for decoders whose backward is small next to the budget (TAESD, small images). The estimate counts the
  bytes autograd saves in a small probe decode and scales them by area (``probe_bytes``).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

VAE_GRADIENTS = ("auto", "full", "checkpointed", "tiled")
MIN_TILE = 8                # latent pixels (64 image pixels for an 8x VAE)
DEFAULT_OVERLAP = 8         # latent pixels of context around a tile
HEADROOM = 1.25             # peak ≈ HEADROOM x the bytes autograd saves; calibrated by bench/real_scale.py
FULL_SHARE = 0.25           # "auto" takes "full" only when it needs at most this share of the budget
CHECKPOINT_RATIO = 0.65     # peak of "checkpointed" / peak of "full" on ComfyUI's KL decoder (bench/README.md)

Decode = Callable[[torch.Tensor], torch.Tensor]
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


class _Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing; attribute reads fall through to it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_composite(module: nn.Module) -> bool:
    return any(_has_parameters(child) for child in module.children())


def checkpointed_view(module: nn.Module) -> nn.Module:
    """A view of ``module`` whose blocks run under activation checkpointing; ``module`` itself is not changed.

    The view is a tree of shallow copies sharing every parameter and buffer with ``module``. Blocks are the
    composite modules (modules with parameter-holding children) that hold fewer than two composite children:
    the residual, attention and upsampling blocks of the LDM/ComfyUI KL decoder and TAESD's ``Block``. The
    containers and the decoder's stages above them are descended into; single layers are left as they are
    (checkpointing one layer saves nothing).
    """

    def view(m: nn.Module, root: bool) -> nn.Module:
        composite_children = sum(_is_composite(c) for c in m.children())
        if root or isinstance(m, _CONTAINERS) or composite_children >= 2:
            new = copy.copy(m)
            new._modules = {name: (None if c is None else view(c, False)) for name, c in m._modules.items()}
            return new
        return _Checkpointed(m) if _is_composite(m) else m

    return view(module, True)


def tiles(size: int, tile: int) -> list[tuple[int, int]]:
    """Cut ``range(size)`` into consecutive ``(start, end)`` pieces of at most ``tile``, balanced in length."""
    n = max(1, math.ceil(size / tile))
    edges = [round(i * size / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


class _Stop(Exception):
    """Ends a decode early, carrying the trunk's output."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class _Capture(nn.Module):
    """Runs the trunk's last module, then stops the decode with its output (``_Stop``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        raise _Stop(self.inner(*args, **kwargs))


class _Inject(nn.Module):
    """Stands in for the trunk's last module and returns a given tensor (a crop of the whole latent's trunk)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


def trunk_path(module: nn.Module) -> str | None:
    """The dotted name of the last module of an LDM/ComfyUI KL decoder's low-resolution trunk (conv_in and the
    mid block with its self-attention): ``decoder.mid.block_2`` in an autoencoder, ``mid.block_2`` in a bare
    decoder; None for decoders without one (TAESD)."""
    names = {name for name, _ in module.named_modules()}
    for name in ("decoder.mid.block_2", "mid.block_2"):
        if name in names:
            return name
    return None


def replaced_view(module: nn.Module, path: str, replacement: nn.Module) -> nn.Module:
    """A view of ``module`` (shallow copies along ``path``, everything else shared) with the submodule at the
    dotted ``path`` replaced by ``replacement``."""
    head, _, rest = path.partition(".")
    new = copy.copy(module)
    new._modules = dict(module._modules)
    new._modules[head] = replaced_view(module._modules[head], rest, replacement) if rest else replacement
    return new


def tiled_vjp(decode: Decode, z: torch.Tensor, v: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """``J_D(z)ᵀ v`` accumulated over output tiles (module docstring, mode "tiled"). ``z``: (B, C, h, w) latent;
    ``v``: (B, 3, H, W) with ``H = s·h``; ``tile`` and ``overlap`` in latent pixels. Returns a tensor like ``z``."""
    return _tiles_vjp(lambda crop, i0, i1, j0, j1: decode(crop), z, v, tile, overlap)


def _tiles_vjp(decode_tile: Callable[..., torch.Tensor], source: torch.Tensor, v: torch.Tensor, tile: int,
               overlap: int) -> torch.Tensor:
    """Σ over tiles of the crop gradients of ``⟨decode_tile(crop)|tile, v|tile⟩``, where ``source`` is what is
    cropped (the latent, or the trunk's output at the same resolution)."""
    h, w = source.shape[-2:]
    scale = v.shape[-1] // w
    if v.shape[-2] != scale * h or v.shape[-1] != scale * w:
        raise ValueError(f"the image gradient {tuple(v.shape[-2:])} is not a multiple of the latent {(h, w)}")
    grad = torch.zeros_like(source, dtype=torch.float32)
    for i0, i1 in tiles(h, tile):
        for j0, j1 in tiles(w, tile):
            a0, a1 = max(0, i0 - overlap), min(h, i1 + overlap)
            b0, b1 = max(0, j0 - overlap), min(w, j1 + overlap)
            with torch.enable_grad():
                crop = source[:, :, a0:a1, b0:b1].detach().requires_grad_(True)
                image = decode_tile(crop, a0, a1, b0, b1)
                core = image[:, :, (i0 - a0) * scale:(i1 - a0) * scale, (j0 - b0) * scale:(j1 - b0) * scale]
                target = v[:, :, i0 * scale:i1 * scale, j0 * scale:j1 * scale].to(core)
                (g,) = torch.autograd.grad((core * target).sum(), crop)
            grad[:, :, a0:a1, b0:b1] += g.float()
    return grad.to(source.dtype)


def trunk_tiled_vjp(module: nn.Module, call: Callable[[nn.Module, torch.Tensor], torch.Tensor], path: str,
                    z: torch.Tensor, v: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Mode "tiled" for a decoder with a low-resolution trunk at ``path`` (``trunk_path``): the trunk (whose
    self-attention sees the whole latent) runs once on the whole latent with grad, only the upsampling head is
    tiled (its input cropped from the trunk's output), and the summed head gradient is pulled back through the
    trunk in one backward pass. The trunk works at the latent's resolution, so holding its graph is cheap."""
    last = module.get_submodule(path)
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        try:
            call(replaced_view(module, path, _Capture(last)), leaf)
            raise RuntimeError(f"the decoder never reached {path}")
        except _Stop as stop:
            trunk = stop.value
        if trunk.shape[-2:] != z.shape[-2:]:
            raise RuntimeError(f"the decoder's trunk output {tuple(trunk.shape)} is not at the latent's resolution")

        def decode_tile(crop: torch.Tensor, a0: int, a1: int, b0: int, b1: int) -> torch.Tensor:
            return call(replaced_view(module, path, _Inject(crop)), leaf.detach()[:, :, a0:a1, b0:b1])

        g_trunk = _tiles_vjp(decode_tile, trunk.detach(), v, tile, overlap)
        (g,) = torch.autograd.grad(trunk, leaf, grad_outputs=g_trunk.to(trunk.dtype))
    return g


def plain_vjp(decode: Decode, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J_D(z)ᵀ v`` by one backward pass through ``decode`` (modes "full" and "checkpointed")."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        image = decode(leaf)
        (g,) = torch.autograd.grad(image, leaf, grad_outputs=v.to(image))
    return g


def _saved_bytes(decode: Decode, crop: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for a backward pass of ``decode(crop)``, without those in
    ``exclude`` (the weights, which do not grow with the image)."""
    seen: dict[int, int] = {}
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        kept.append(t)   # alive until the probe ends, as in a real graph, so storages are told apart by address
        return None

    def unpack(_: None) -> torch.Tensor:   # stored in the graph: it must not reach ``kept``
        raise RuntimeError("the memory probe keeps no tensors for backward")

    # The graph keeps only ``unpack`` and None: had it kept ``t`` itself, a saved output (ReLU's, tanh's) would be
    # tied to its own grad_fn, a cycle Python's collector cannot see, and every probe's graph would stay in memory.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        decode(crop.detach().requires_grad_(True))
    kept.clear()
    return sum(seen.values())


def probe_bytes(decode: Decode, z: torch.Tensor, side: int = 8, module: nn.Module | None = None) -> float:
    """Bytes autograd saves per latent pixel (one sample) for a backward pass through ``decode``: the slope
    between ``side`` x ``side`` and ``2·side`` x ``2·side`` crops of ``z`` (each storage counted once, the
    parameters and buffers of ``module`` left out), so constant parts drop out of the per-pixel cost."""
    exclude = set()
    if module is not None:
        exclude = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    small, large = min(side, z.shape[-2], z.shape[-1]), min(2 * side, z.shape[-2], z.shape[-1])
    b_small = _saved_bytes(decode, z[:1, :, :small, :small], exclude)
    if large == small:
        return b_small / small**2
    b_large = _saved_bytes(decode, z[:1, :, :large, :large], exclude)
    return max(b_large - b_small, 0) / (large**2 - small**2) or b_small / small**2


def free_memory(device: torch.device) -> int:
    """Bytes the process can still allocate on ``device``: CUDA's free memory plus what torch's caching allocator
    holds unused, or the system's available RAM (``MemAvailable`` of /proc/meminfo; 8 GiB (4 on Windows) where
    that file does not exist)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30 if os.name != "nt" else 4 << 30


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Plan:
    """A resolved choice: ``mode`` (never "auto"), ``tile`` (latent pixels, tiled mode), ``overlap`` and the
    estimated peak bytes of the choice; ``reason`` says why (logged by the hosts)."""

    mode: str
    tile: int = 0
    overlap: int = 0
    estimate: float = 0.0
    reason: str = ""


def plan(requested: str, latent_hw: tuple[int, int], batch: int, bytes_per_pixel: float, budget: float,
         tile: int = 0, overlap: int = DEFAULT_OVERLAP, checkpoint_ratio: float = CHECKPOINT_RATIO) -> Plan:
    """Resolve ``requested`` (one of ``VAE_GRADIENTS``) for a latent of ``latent_hw`` and ``batch`` samples.

    ``bytes_per_pixel`` comes from ``probe_bytes``; ``budget`` is the memory the gradient may use (bytes).
    "auto" takes full when it needs at most ``FULL_SHARE`` of the budget, else the first of checkpointed
    (estimated at ``checkpoint_ratio`` of full: block inputs and one block's inside are kept) and tiled that fits. ``tile`` = 0 picks the largest tile that fits (at least
    ``MIN_TILE``). Raises ``ValueError`` naming the fix for a tile larger than the latent or a budget
    below what the smallest tile needs.
    """
    if requested not in VAE_GRADIENTS:
        raise ValueError(f"vae_gradient must be one of {VAE_GRADIENTS}, got {requested!r}")
    h, w = latent_hw
    if tile < 0 or overlap < 0:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be >= 0 latent pixels")
    if tile and tile > max(h, w):
        raise ValueError(f"the VAE gradient tile ({tile} latent px) is larger than the latent ({w}x{h}); use a "
                         f"tile of at most {max(h, w)} or 0 (automatic)")
    full = HEADROOM * bytes_per_pixel * h * w * batch
    if requested == "full":
        return Plan("full", estimate=full, reason="as set")
    if requested == "checkpointed":
        return Plan("checkpointed", estimate=full * checkpoint_ratio, reason="as set")
    if requested == "auto" and full <= FULL_SHARE * budget:
        return Plan("full", estimate=full, reason=f"full backward ~{_size(full)}, small next to {_size(budget)}")
    checkpointed = full * checkpoint_ratio
    if requested == "auto" and checkpointed <= budget:
        return Plan("checkpointed", estimate=checkpointed,
                    reason=f"exact, ~{_size(checkpointed)} instead of the full backward's ~{_size(full)} "
                           f"(budget {_size(budget)})")

    def tile_bytes(t: int) -> float:
        return HEADROOM * bytes_per_pixel * min(h, t + 2 * overlap) * min(w, t + 2 * overlap) * batch

    if tile == 0:
        tile = max(h, w)
        while tile > MIN_TILE and tile_bytes(tile) > budget:
            tile = max(MIN_TILE, tile // 2)
    if tile_bytes(tile) > budget:
        raise ValueError(f"the VAE gradient needs ~{_size(tile_bytes(tile))} even in tiles of {tile} latent px, "
                         f"more than the {_size(budget)} available; use the fast decoder (TAESD), a smaller "
                         "tile, a smaller image, or free memory")
    estimate = tile_bytes(tile)
    return Plan("tiled", tile=tile, overlap=overlap, estimate=estimate,
                reason=f"tiles of {tile} latent px (+{overlap} overlap), ~{_size(estimate)}")


@dataclass
class DecoderGradient:
    """The decoder of a latent model and how to differentiate through it.

    ``module`` is the decoder network and ``call(module, z)`` decodes a latent (model space) to an image in
    [-1, 1] with it, differentiably (the host adapter undoes its latent format there). The modes call it with
    views of ``module`` (``checkpointed_view``, ``replaced_view``), so ``module`` is never changed. ``mode`` is one of
    ``VAE_GRADIENTS``; ``budget`` the bytes the gradient may use (None: half the free memory of the latent's
    device). The plan is made once per latent shape and kept (``plans``).
    """

    module: nn.Module
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    mode: str = "auto"
    tile: int = 0
    overlap: int = DEFAULT_OVERLAP
    budget: float | None = None
    plans: dict = field(default_factory=dict, init=False, repr=False)
    _bytes_per_pixel: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in VAE_GRADIENTS:
            raise ValueError(f"vae_gradient must be one of {VAE_GRADIENTS}, got {self.mode!r}")
        if self.tile < 0 or self.overlap < 0:
            raise ValueError(f"tile ({self.tile}) and overlap ({self.overlap}) must be >= 0 latent pixels")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The image of ``z`` through the decoder as it is (differentiable when grad is on)."""
        return self.call(self.module, z)

    def plan_for(self, z: torch.Tensor) -> Plan:
        """The mode (and tile) used for latents shaped like ``z``."""
        key = tuple(z.shape)
        if key not in self.plans:
            measured = self.mode == "auto" or (self.mode == "tiled" and not self.tile)
            if measured and self._bytes_per_pixel is None:
                self._bytes_per_pixel = probe_bytes(self.decode, z, module=self.module)
            if measured:
                per_pixel = self._bytes_per_pixel
                budget = self.budget if self.budget is not None else free_memory(z.device) / 2
            else:   # the user's explicit choice: no estimate needed
                per_pixel, budget = 0.0, math.inf
            self.plans[key] = plan(self.mode, (z.shape[-2], z.shape[-1]), z.shape[0], per_pixel, budget,
                                   self.tile, self.overlap)
        return self.plans[key]

    def image(self, z: torch.Tensor) -> torch.Tensor:
        """The decoded image, without a graph."""
        with torch.no_grad():
            return self.decode(z)

    def gradient(self, z: torch.Tensor, objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``objective(image)`` returns (per-sample distance, scalar to differentiate); returns the distance and
        the scalar's gradient with respect to the latent ``z``. Modes "full" and "checkpointed" decode once with a
        graph and backpropagate; "tiled" takes ``v = ∂/∂image`` on a no-grad decode, then ``vjp``."""
        chosen = self.plan_for(z)
        if chosen.mode == "tiled":
            image = self.image(z).detach().requires_grad_(True)
            with torch.enable_grad():
                distance, total = objective(image)
                (v,) = torch.autograd.grad(total, image)
            return distance.detach(), self.vjp(z, v)
        module = checkpointed_view(self.module) if chosen.mode == "checkpointed" else self.module
        with torch.enable_grad():
            leaf = z.detach().requires_grad_(True)
            distance, total = objective(self.call(module, leaf))
            (g,) = torch.autograd.grad(total, leaf)
        return distance.detach(), g

    def vjp(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J_D(z)ᵀ v`` by the planned mode."""
        chosen = self.plan_for(z)
        if chosen.mode == "tiled":
            path = trunk_path(self.module)
            if path is not None:
                return trunk_tiled_vjp(self.module, self.call, path, z, v, chosen.tile, chosen.overlap)
            return tiled_vjp(self.decode, z, v, chosen.tile, chosen.overlap)
        if chosen.mode == "checkpointed":
            view = checkpointed_view(self.module)
            return plain_vjp(lambda latent: self.call(view, latent), z, v)
        return plain_vjp(self.decode, z, v)
