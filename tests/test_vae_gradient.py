"""Memory-bounded gradients through a decoder (dps.vae_gradient): exact where claimed, close where tiled."""

import pytest
import torch
from torch import nn

from dps.guidance import DPSGuidance
from dps.noise import Gaussian
from dps.operators import GaussianBlur, Inpainting, SuperResolution, box_mask
from dps.vae_gradient import (FULL_SHARE, HEADROOM, DecoderGradient, checkpointed_view, plain_vjp, plan, probe_bytes, tiled_vjp, tiles,
                              trunk_path, trunk_tiled_vjp)


class ResBlock(nn.Module):
    def __init__(self, ch: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, ch) if norm else nn.Identity()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, temb=None):
        return x + self.conv2(torch.nn.functional.silu(self.conv1(torch.nn.functional.silu(self.norm(x)))))


class GlobalMix(nn.Module):
    """Stands in for the mid-block self-attention: every position sees the mean of the whole latent."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        return x + self.proj(x.mean(dim=(-2, -1), keepdim=True)).expand_as(x)


class Up(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    def __init__(self, ch: int, norm: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList([ResBlock(ch, norm), ResBlock(ch, norm)])
        self.upsample = Up(ch)


class ToyDecoder(nn.Module):
    """The shape of the LDM/ComfyUI KL decoder (conv_in, mid blocks, up stages of res blocks + upsample,
    norm_out, conv_out), 4x upsampling, small enough for CPU tests."""

    def __init__(self, norm: bool = True, ch: int = 16, attention: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(ch, norm)
        self.mid.attn_1 = GlobalMix(ch) if attention else nn.Identity()
        self.mid.block_2 = ResBlock(ch, norm)
        self.up = nn.ModuleList([Stage(ch, norm), Stage(ch, norm)])
        self.norm_out = nn.GroupNorm(4, ch) if norm else nn.Identity()
        self.conv_out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z), None)), None)
        for stage in self.up:
            for block in stage.block:
                h = block(h, None)
            h = stage.upsample(h)
        return torch.tanh(self.conv_out(torch.nn.functional.silu(self.norm_out(h))))


def latent(shape=(2, 4, 16, 16), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_checkpointed_view_gives_the_exact_gradient_and_leaves_the_module_alone():
    decoder = ToyDecoder()
    view = checkpointed_view(decoder)
    z, v = latent(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(plain_vjp(view, z, v), plain_vjp(decoder, z, v), rtol=1e-5, atol=1e-6)
    assert type(decoder.mid.block_1) is ResBlock and type(decoder.up[0].block[0]) is ResBlock   # untouched
    assert type(view.mid.block_1) is not ResBlock and type(view.up[1].upsample) is not Up      # wrapped
    assert view.conv_out is decoder.conv_out                                                  # shared
    assert {id(p) for p in view.parameters()} == {id(p) for p in decoder.parameters()}


def test_checkpointing_saves_fewer_activations():
    decoder = ToyDecoder()
    z = latent((1, 4, 32, 32))
    full = probe_bytes(decoder, z, module=decoder)
    assert probe_bytes(checkpointed_view(decoder), z, module=decoder) < 0.6 * full
    # the weights are not counted, and the per-pixel cost does not depend on the probe's size
    assert abs(probe_bytes(decoder, z, side=4, module=decoder) - full) < 0.05 * full


def test_tiles_partition_the_range():
    for size, tile in [(16, 8), (17, 8), (5, 8), (64, 24)]:
        parts = tiles(size, tile)
        assert parts[0][0] == 0 and parts[-1][1] == size
        assert all(a1 == b0 for (_, a1), (b0, _) in zip(parts, parts[1:]))
        assert all(0 < b - a <= tile for a, b in parts)


def test_tiled_gradient_is_exact_for_a_local_decoder():
    """Without layers that see the whole image, an overlap beyond the receptive field gives the exact VJP."""
    decoder = ToyDecoder(norm=False)
    z, v = latent(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(tiled_vjp(decoder, z, v, tile=5, overlap=8), plain_vjp(decoder, z, v),
                               rtol=1e-4, atol=1e-5)


def test_the_trunk_with_global_attention_is_differentiated_whole():
    """Tiles cut the mid block's global mixing short; running the trunk on the whole latent keeps it exact."""
    decoder = ToyDecoder(norm=False, attention=True)
    z, v = latent(), torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    reference = plain_vjp(decoder, z, v)
    assert trunk_path(decoder) == "mid.block_2"
    split = trunk_tiled_vjp(decoder, lambda m, z_: m(z_), "mid.block_2", z, v, tile=5, overlap=8)
    torch.testing.assert_close(split, reference, rtol=1e-4, atol=1e-5)
    plain_tiles = tiled_vjp(decoder, z, v, tile=5, overlap=8)                        # tiles cut the mixing short
    assert (plain_tiles - reference).norm() > 100 * (split - reference).norm()
    assert type(decoder.mid.block_2) is ResBlock                                      # the module is untouched


@pytest.mark.parametrize("make_op", [lambda: SuperResolution(4), lambda: GaussianBlur(9, 2.0),
                                     lambda: Inpainting(box_mask(128, 128, box=(48, 48), margin=(16, 16),
                                                                 generator=torch.Generator().manual_seed(0)))])
def test_tiled_gradient_through_groupnorm_is_close_on_each_task(make_op):
    """Per-tile GroupNorm statistics make tiles approximate; on this KL-shaped decoder the gradient stays close."""
    decoder, op = ToyDecoder(norm=True), make_op()
    z = latent((1, 4, 32, 32))
    with torch.no_grad():
        y = op(decoder(latent((1, 4, 32, 32), seed=5)))
    g = DPSGuidance(op, Gaussian(0.05), y, decoder=decoder)
    image = decoder(z).detach().requires_grad_(True)
    (v,) = torch.autograd.grad(g.image_distance(image).sum(), image)
    assert cosine(tiled_vjp(decoder, z, v, tile=8, overlap=8), plain_vjp(decoder, z, v)) > 0.98


@pytest.mark.parametrize("mode", ["full", "checkpointed", "tiled"])
@pytest.mark.parametrize("gradient", ["full", "x0_only"])
def test_guidance_through_a_decoder_gradient_matches_the_plain_path(mode, gradient):
    decoder = ToyDecoder(norm=False)
    op = SuperResolution(4)
    with torch.no_grad():
        y = op(decoder(latent((2, 4, 16, 16), seed=5)))
    denoiser = nn.Conv2d(4, 4, 3, padding=1)
    plain = DPSGuidance(op, Gaussian(0.05), y, rule="dps", mode=gradient, decoder=decoder)
    bounded = DPSGuidance(op, Gaussian(0.05), y, rule="dps", mode=gradient, decoder_gradient=DecoderGradient(
        decoder, lambda module, z: module(z), mode=mode, tile=5 if mode == "tiled" else 0, overlap=8))
    x = latent()
    a, b = plain.evaluate(x, denoiser), bounded.evaluate(x, denoiser)
    torch.testing.assert_close(b.distance, a.distance)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_auto_mode_follows_the_budget():
    decoder = ToyDecoder()
    z = latent((1, 4, 32, 32))
    full = HEADROOM * probe_bytes(decoder, z, module=decoder) * 32 * 32
    roomy = DecoderGradient(decoder, lambda m, z_: m(z_), budget=1e12)
    ample = DecoderGradient(decoder, lambda m, z_: m(z_), budget=2 * full)      # fits, but not small next to it
    middle = DecoderGradient(decoder, lambda m, z_: m(z_), budget=0.8 * full)
    tight = DecoderGradient(decoder, lambda m, z_: m(z_), budget=0.15 * full, overlap=2)
    assert roomy.plan_for(z).mode == "full"
    assert ample.plan_for(z).mode == "checkpointed"
    assert middle.plan_for(z).mode == "checkpointed"
    assert tight.plan_for(z).mode == "tiled" and tight.plan_for(z).tile == 8
    v = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(middle.vjp(z, v), roomy.vjp(z, v), rtol=1e-5, atol=1e-6)
    assert cosine(tight.vjp(z, v), roomy.vjp(z, v)) > 0.9


def test_plan_picks_by_budget_and_names_the_fix():
    per_px = 1000.0
    assert plan("auto", (64, 64), 1, per_px, budget=1e12).mode == "full"
    assert plan("auto", (64, 64), 1, per_px, budget=5.2e6 / FULL_SHARE).mode == "full"
    assert plan("auto", (64, 64), 1, per_px, budget=5.0e6 / FULL_SHARE).mode == "checkpointed"
    assert plan("auto", (64, 64), 1, per_px, budget=4e6).mode == "checkpointed"   # full: 1.25 x 1000 x 64² = 5.1e6
    tiled = plan("auto", (64, 64), 1, per_px, budget=1e6)
    assert tiled.mode == "tiled" and tiled.estimate <= 1e6 and tiled.tile == 8
    with pytest.raises(ValueError, match="larger than the latent"):
        plan("tiled", (64, 64), 1, per_px, budget=1e12, tile=100)
    with pytest.raises(ValueError, match="fast decoder"):
        plan("auto", (64, 64), 1, per_px, budget=1e3)
    with pytest.raises(ValueError, match="vae_gradient must be one of"):
        plan("tiles", (64, 64), 1, per_px, budget=1e12)


def test_the_memory_probe_keeps_no_graph_alive():
    """ReLU and tanh save their outputs for backward: a probe that kept those tensors tied each one to its own
    grad_fn, a cycle the collector cannot see, and every guided host run leaked the probe's graph (issue 14,
    measured ~10 MiB per prompt in a real ComfyUI)."""
    import gc

    decoder = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),
                            nn.Conv2d(16, 3, 3, padding=1), nn.Tanh())
    z = torch.randn(1, 4, 16, 16)

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    probe_bytes(decoder, z, module=decoder)
    before = live()
    for _ in range(3):
        assert probe_bytes(decoder, z, module=decoder) > 0
    assert live() == before
