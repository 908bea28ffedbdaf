"""Activation recomputation of a denoiser's blocks for DPS's gradient through the denoiser (mode "full").

DPS differentiates ``d(x_t) = ‖y − A(D(x0_hat(x_t)))‖`` with respect to ``x_t`` through the denoiser (Chung et al.
2023, Algorithm 1: ``∇_{x_t} ‖y − A(x0_hat)‖``). A plain backward pass keeps every activation of the denoiser's
forward pass until it runs: for the SD1.5 UNet at 512 px with CFG in float32 about 8.4 GiB (``bench/README.md``,
real_step), far more at 1024 px. Activation checkpointing (Chen et al. 2016, *Training deep nets with sublinear
memory cost*, arXiv 1604.06174) keeps only each block's input and recomputes the block's inside when the backward
pass reaches it: the same arithmetic, so the same gradient, for one more forward pass of the recomputed blocks.

The host's model is not changed and not wrapped: ``BlockRecompute.active`` registers a forward pre-hook and a
forward hook on each chosen block (``torch.nn.Module`` hooks, removed when the forward pass ends). Between them
the block's saved tensors go through ``torch.autograd.graph.saved_tensors_hooks``: the graph stores a number
instead of the tensor, and the first time the backward pass asks for one, the block is run again on a copy of the
inputs it was called with (and the random number generator's state then) and every tensor it saves is kept (a copy, so that an in-place update later in the
block, such as FLUX's ``txt += ...`` or ComfyUI's ``h += ctrl``, cannot change it) and handed out once each.

``"auto"`` measures before it chooses: its first evaluation recomputes every block and counts the bytes each block
saves (each storage once, parameters left out); from then on it recomputes the largest blocks until what the rest
keeps is at most ``SHARE`` of the budget (half the device's free memory, as ``dps.vae_gradient``), so a small
image keeps the plain backward pass (no recomputation) and SDXL at 1024 px recomputes what it must.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .vae_gradient import _CONTAINERS, _is_composite, _size, free_memory

__all__ = ["DENOISER_GRADIENTS", "SHARE", "BlockRecompute", "blocks", "RecomputeMismatchError"]

DENOISER_GRADIENTS = ("auto", "full", "checkpointed")
SHARE = 0.25      # "auto" keeps the plain backward of blocks whose saved tensors fit in this share of the budget


class RecomputeMismatchError(RuntimeError):
    """A block saved a different number of tensors when recomputed: it is not deterministic (dropout in training
    mode, data-dependent control flow), so its gradient cannot be recomputed."""


def blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` to recompute: descending from the root through containers (``ModuleList``,
    ``Sequential``, ``ModuleDict``), every module that is not a container and holds a parameter-holding child
    (the UNet's residual, attention, down- and upsampling blocks; FLUX's and SD3's transformer blocks). Single
    layers are left as they are (recomputing one layer keeps as much as it saves)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module, root: bool) -> None:
        if root or isinstance(m, _CONTAINERS):
            for child in m.children():
                visit(child, False)
        elif _is_composite(m):
            found.append(m)

    visit(model, True)
    return found


@dataclass(frozen=True)
class _Input:
    """A tensor argument as it was at the call, and whether it required grad."""

    tensor: torch.Tensor
    requires_grad: bool


def _snapshot(value: Any) -> Any:
    """A copy of a block's arguments as they are at the call: tensors detached and cloned, dicts, lists and tuples
    copied one level at a time (ComfyUI counts transformer blocks in its ``transformer_options`` dict)."""
    if isinstance(value, torch.Tensor):
        return _Input(value.detach().clone(), value.requires_grad)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_snapshot(v) for v in value)
    return value


def _restore(value: Any) -> Any:
    """Fresh inputs from a ``_snapshot``: copies (the block may update them in place), requiring grad where the
    originals did and, like them, not leaves of the graph."""
    if isinstance(value, _Input):
        return value.tensor.detach().requires_grad_(value.requires_grad).clone()
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_restore(v) for v in value)
    return value


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except TypeError:      # torch < 2.4: no per-device query
        return False, None


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _Call:
    """One call of one block: what the graph needs to recompute its saved tensors."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict, parameters: set[int] | None,
                 busy: list) -> None:
        self.module = module
        self.busy = busy        # the calls under way: a block's hooks do nothing while one is recomputed
        self.inputs = _snapshot((args, kwargs))
        first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.autocast = _autocast_state(self.device.type)
        self.rng = _rng_state(self.device)          # dropout draws the same mask when recomputed
        self.parameters = parameters                # the model's storages; None: the saved bytes are not counted
        self.count = 0
        self.nbytes = 0
        self._storages: set[int] = set()
        self._values: list[torch.Tensor | None] | None = None
        self._left = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor) -> int:
        index = self.count
        self.count += 1
        if self.parameters is None:
            return index
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.parameters and ptr not in self._storages:
                self._storages.add(ptr)
                self.nbytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return index

    def unpack(self, index: int) -> torch.Tensor:
        if self._values is None or self._values[index] is None:
            self._values = self._recompute()
            self._left = len(self._values)
        value, self._values[index] = self._values[index], None
        self._left -= 1
        if self._left <= 0:
            self._values = None
        return value

    def _recompute(self) -> list[torch.Tensor | None]:
        kept: list[torch.Tensor | None] = []

        def keep(t: torch.Tensor) -> None:
            kept.append(t if isinstance(t, nn.Parameter) else t.detach().clone())

        def refuse(_: None) -> torch.Tensor:
            raise RuntimeError("a recomputed block's own graph is never differentiated")

        enabled, dtype = self.autocast
        autocast = torch.autocast(self.device.type, dtype=dtype) if enabled else nullcontext()
        cuda = [self.device] if self.device.type == "cuda" else []
        self.busy.append((self, None))
        try:
            with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad(), autocast, \
                    torch.autograd.graph.saved_tensors_hooks(keep, refuse):
                _set_rng_state(self.device, self.rng)
                args, kwargs = _restore(self.inputs)       # with grad on: the copies require grad as the inputs did
                self.module(*args, **kwargs)
        finally:
            self.busy.remove((self, None))
        if len(kept) != self.count:
            raise RecomputeMismatchError(
                f"{type(self.module).__name__} saved {len(kept)} tensors when recomputed, {self.count} in the "
                "forward pass: it does not compute the same way twice (dropout in training mode?). Set the "
                "denoiser gradient to 'full' (no recomputation) or gradient to 'x0_only'")
        return kept


@dataclass
class BlockRecompute:
    """Which blocks of ``model`` (a denoiser network: ComfyUI's ``diffusion_model``, the WebUI's UNet) recompute
    their activations in DPS's backward pass, and the hooks that do it (see the module docstring).

    ``mode``: one of ``DENOISER_GRADIENTS``: "full" never recomputes, "checkpointed" recomputes every block, "auto"
    measures on its first evaluation and then recomputes what the budget needs (``plan``). ``budget``: the bytes
    the kept activations may use (None: half the free memory of the input's device when planning).
    """

    model: nn.Module
    mode: str = "auto"
    budget: float | None = None
    chosen: list[nn.Module] | None = field(default=None, init=False)
    measured: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    reason: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.mode not in DENOISER_GRADIENTS:
            raise ValueError(f"the denoiser gradient must be one of {DENOISER_GRADIENTS}, got {self.mode!r}")
        self.blocks = blocks(self.model)
        if self.mode == "full":
            self.chosen, self.reason = [], "as set: plain backward pass"
        elif self.mode == "checkpointed":
            self.chosen, self.reason = list(self.blocks), f"as set: all {len(self.blocks)} blocks recomputed"
        elif not self.blocks:
            self.chosen, self.reason = [], "plain backward pass (the model has no blocks to recompute)"

    @property
    def planned(self) -> bool:
        return self.chosen is not None

    @contextmanager
    def active(self, device: torch.device | None = None) -> Iterator[None]:
        """Around the denoiser's forward pass with grad: the chosen blocks' saved tensors are recomputed in the
        backward pass (which may run after the context ends). Unplanned ("auto"'s first call): every block is
        recomputed and measured, and the plan is made when the forward pass ends."""
        chosen = self.blocks if self.chosen is None else self.chosen
        calls: list[_Call] = []
        if not chosen:
            yield
            return
        parameters = None                  # counted only while measuring (the plan is made once)
        if self.chosen is None:
            parameters = {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]}
        current: list[tuple[_Call, nn.Module | None]] = []   # (call, its module), or (call, None) when recomputed
        index = {id(m): i for i, m in enumerate(self.blocks)}

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if current or not torch.is_grad_enabled():     # nested in a recomputed block, or no graph to keep
                return
            call = _Call(module, args, kwargs, parameters, current)
            call.hooks.__enter__()
            current.append((call, module))
            calls.append(call)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if current and current[-1][1] is module:
                current.pop()[0].hooks.__exit__(None, None, None)

        handles = []
        try:
            for m in chosen:
                handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
            yield
        finally:
            for h in handles:
                h.remove()
            while current and current[-1][1] is not None:
                current.pop()[0].hooks.__exit__(None, None, None)
        if self.chosen is None and calls:
            for call in calls:
                key = index[id(call.module)]
                self.measured[key] = self.measured.get(key, 0) + call.nbytes
            budget = self.budget if self.budget is not None else free_memory(device or torch.device("cpu")) / 2
            self.plan(budget)

    def plan(self, budget: float) -> None:
        """Choose the blocks to recompute from ``measured``: the largest first, until the bytes the others keep are
        at most ``SHARE`` of ``budget``."""
        total = sum(self.measured.values())
        allowed = SHARE * budget
        order = sorted(self.measured, key=lambda i: -self.measured[i])
        kept, chosen = total, []
        for i in order:
            if kept <= allowed:
                break
            chosen.append(self.blocks[i])
            kept -= self.measured[i]
        self.chosen = chosen
        if not chosen:
            self.reason = f"plain backward pass (keeps ~{_size(total)}, small next to {_size(budget)})"
        else:
            self.reason = (f"{len(chosen)} of {len(self.blocks)} blocks recomputed, exact: keeps ~{_size(kept)} "
                           f"instead of ~{_size(total)} (budget {_size(budget)})")


