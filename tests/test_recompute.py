"""dps.recompute: the denoiser's blocks recompute their activations in the backward pass, with the same gradient.

The toy denoiser has what the real hosts' networks do that recomputation must survive: an in-place update of a
block's input after a layer saved it (FLUX's ``txt += ...``), an in-place update of a block's output (ComfyUI's
``h += ctrl``), a dict of options counted up during the call (``transformer_options``), keyword arguments and
dropout; and it is differentiated under ``allow_mutation_on_saved_tensors`` as the host adapters do.
"""

from __future__ import annotations

import gc
import weakref
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from dps import Gaussian
from dps.guidance import DPSGuidance
from dps.operators import SuperResolution
from dps.recompute import BlockRecompute, RecomputeMismatchError, blocks


class Block(nn.Module):
    def __init__(self, c: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.up, self.down = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.drop = nn.Dropout(dropout)
        self.inner: weakref.ref | None = None

    def forward(self, x: torch.Tensor, options: dict, scale: torch.Tensor | None = None) -> torch.Tensor:
        hidden = nn.functional.gelu(self.up(self.norm1(x)))      # norm1 saves x ...
        self.inner = weakref.ref(hidden)
        x += self.down(self.drop(hidden))                      # ... which is then updated in place
        options["index"] += 1
        h = self.norm2(x) * (1 + scale * options["index"])      # uses the count at the call
        return torch.tanh(h)


class Net(nn.Module):
    def __init__(self, c: int = 16, depth: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(8, c)
        self.blocks = nn.ModuleList([Block(c, dropout) for _ in range(depth)])
        self.out = nn.Linear(c, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        options = {"index": 0}
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, options, scale=torch.full((h.shape[-1],), 0.1, dtype=h.dtype))
            h += 0.5 * x.mean()                                # in place on a block's output
        return self.out(h)


def forward(net: nn.Module, x: torch.Tensor, recompute: BlockRecompute | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, net(leaf)) with ``recompute`` active when given."""
    leaf = x.clone().requires_grad_(True)
    with recompute.active() if recompute is not None else nullcontext():
        return leaf, net(leaf)


def gradient(net: nn.Module, x: torch.Tensor, recompute: BlockRecompute | None, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        leaf, out = forward(net, x, recompute)
        torch.manual_seed(seed + 1)                            # the backward pass runs with another RNG state
        (g,) = torch.autograd.grad(out.square().sum(), leaf)
    return g


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().double()


X = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_blocks_are_the_composite_modules_under_containers(net):
    assert blocks(net) == list(net.blocks)


def test_checkpointed_gradient_equals_the_plain_one(net):
    plain = gradient(net, X, None)
    rec = BlockRecompute(net, mode="checkpointed")
    assert rec.chosen == list(net.blocks)
    assert torch.equal(gradient(net, X, rec), plain)


def test_dropout_draws_the_same_mask_when_recomputed():
    torch.manual_seed(0)
    net = Net(dropout=0.5).double().train()
    plain = gradient(net, X, None, seed=3)
    assert torch.equal(gradient(net, X, BlockRecompute(net, mode="checkpointed"), seed=3), plain)


def test_activations_inside_a_recomputed_block_are_not_kept(net):
    def inner_alive(recompute):
        with torch.enable_grad(), torch.autograd.graph.allow_mutation_on_saved_tensors():
            _, out = forward(net, X, recompute)
            gc.collect()
            alive = [b.inner() is not None for b in net.blocks]
            out.sum().backward()
        return alive

    assert inner_alive(None) == [True] * 3                     # the plain graph holds them until the backward
    assert inner_alive(BlockRecompute(net, mode="checkpointed")) == [False] * 3


def test_auto_measures_then_recomputes_only_what_the_budget_needs(net):
    plain = gradient(net, X, None)
    small = BlockRecompute(net, mode="auto", budget=1.0)
    assert not small.planned
    assert torch.equal(gradient(net, X, small), plain)         # the measuring evaluation recomputes every block
    assert small.planned and len(small.measured) == 3 and all(v > 0 for v in small.measured.values())
    assert {id(b) for b in small.chosen} == {id(b) for b in net.blocks} and "3 of 3 blocks" in small.reason
    assert torch.equal(gradient(net, X, small), plain)

    total = sum(small.measured.values())
    roomy = BlockRecompute(net, mode="auto", budget=10 * total)   # SHARE (1/4) of it holds everything
    gradient(net, X, roomy)
    assert roomy.chosen == [] and "plain backward" in roomy.reason

    partial = BlockRecompute(net, mode="auto", budget=1.0)
    assert torch.equal(gradient(net, X, partial), plain)
    measured = partial.measured                                   # (each run's count of its own storages)
    partial.plan(4 * (sum(measured.values()) - max(measured.values())))   # the rest fits once one recomputes
    assert len(partial.chosen) == 1 and torch.equal(gradient(net, X, partial), plain)


def test_full_never_recomputes(net):
    rec = BlockRecompute(net, mode="full")
    assert rec.chosen == [] and torch.equal(gradient(net, X, rec), gradient(net, X, None))


def test_a_block_that_computes_differently_twice_is_an_error():
    class Moody(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.calls = nn.Linear(4, 4), 0

        def forward(self, x):
            self.calls += 1
            h = self.lin(x)
            return h.sigmoid() if self.calls == 1 else h.exp().sin()   # saves a different number of tensors

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(Moody())])

        def forward(self, x):
            return self.blocks[0](x)

    net = Wrapper()
    rec = BlockRecompute(net, mode="checkpointed")
    x = torch.randn(2, 4, requires_grad=True)
    with rec.active():
        out = net(x)
    with pytest.raises(RecomputeMismatchError, match="gradient to 'x0_only'"):
        out.sum().backward()


def test_bad_mode_names_the_choices(net):
    with pytest.raises(ValueError, match="auto"):
        BlockRecompute(net, mode="tiled")


def test_guidance_gradient_is_the_same_with_the_denoiser_recomputed(net):
    """DPSGuidance in mode "full" with ``denoiser_recompute``: the same gradient, under the host adapters'
    ``inplace_safe`` and under ``torch.inference_mode`` as hosts sample."""
    net = net.float()
    op = SuperResolution(2)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    y = op(image)

    def x0_fn(x: torch.Tensor) -> torch.Tensor:     # (B, 3, 8, 8) -> the net on rows of 8 -> the same shape
        return torch.tanh(net(x.reshape(1, -1, 8))).reshape(x.shape)

    x = torch.randn(1, 3, 8, 8)
    results = []
    for recompute in (None, BlockRecompute(net, mode="checkpointed")):
        g = DPSGuidance(op, Gaussian(0.05), y, zeta=1.0, rule="dps", inplace_safe=True, denoiser_recompute=recompute)
        with torch.inference_mode():
            results.append(g.evaluate(x, x0_fn))
    assert results[0].grad.abs().max() > 0
    assert torch.allclose(results[1].grad, results[0].grad, rtol=0, atol=1e-7)
    assert torch.equal(results[1].distance, results[0].distance)
