"""Write a Stable Diffusion 1.5 checkpoint with the real architecture and random (seeded) weights.

The file is one safetensors file in the original LDM key layout that the WebUIs load:
``model.diffusion_model.*`` (the UNet, 860 M parameters), ``first_stage_model.*`` (the KL VAE, 84 M),
``cond_stage_model.transformer.text_model.*`` (the CLIP ViT-L/14 text encoder, 123 M) and the DDPM schedule
buffers (``betas``, ``alphas_cumprod``, ...). Every key and shape is that of a real SD1.5 checkpoint, so a host
picks its SD1.5 config from the keys (AUTOMATIC1111: its own ``configs/v1-inference.yaml``; Forge:
``huggingface_guess``) and cannot tell it from a trained one. The weights are random, so the images are noise:
good for plumbing, memory and time, never for quality.

Nothing else is needed from this file's side. The host still needs the CLIP *tokenizer* files
(``tests/hosts/setup_webui.py`` installs them; Forge ships its own).

Usage: ``python tests/hosts/make_sd15_checkpoint.py OUT.safetensors [--seed 0] [--dtype float16]``
(float16: 2.1 GB on disk; the host upcasts with ``--no-half``; float32: 4.3 GB). Needs torch and safetensors.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Iterator

import torch

Shape = tuple[int, ...]

# SD1.5 (v1-inference.yaml): UNet
MODEL_CHANNELS = 320
CHANNEL_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
ATTENTION_LEVELS = (0, 1, 2)  # attention_resolutions [4, 2, 1] = the first three levels
CONTEXT_DIM = 768
TIME_EMBED_DIM = 4 * MODEL_CHANNELS
# KL VAE (ddconfig)
VAE_CH = 128
VAE_CH_MULT = (1, 2, 4, 4)
VAE_RES_BLOCKS = 2
Z_CHANNELS = 4
# CLIP ViT-L/14 text encoder
CLIP_WIDTH = 768
CLIP_LAYERS = 12
CLIP_MLP = 3072
CLIP_VOCAB = 49408
CLIP_POSITIONS = 77
# DDPM schedule ("scaled linear")
TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.0120


def _norm(prefix: str, ch: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (ch,)
    yield f"{prefix}.bias", (ch,)


def _conv(prefix: str, c_out: int, c_in: int, k: int) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (c_out, c_in, k, k)
    yield f"{prefix}.bias", (c_out,)


def _linear(prefix: str, c_out: int, c_in: int, bias: bool = True) -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.weight", (c_out, c_in)
    if bias:
        yield f"{prefix}.bias", (c_out,)


# -- UNet (ldm.modules.diffusionmodules.openaimodel.UNetModel) ----------------------------------------------

def _res_block(p: str, c_in: int, c_out: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.in_layers.0", c_in)
    yield from _conv(f"{p}.in_layers.2", c_out, c_in, 3)
    yield from _linear(f"{p}.emb_layers.1", c_out, TIME_EMBED_DIM)
    yield from _norm(f"{p}.out_layers.0", c_out)
    yield from _conv(f"{p}.out_layers.3", c_out, c_out, 3)
    if c_in != c_out:
        yield from _conv(f"{p}.skip_connection", c_out, c_in, 1)


def _spatial_transformer(p: str, ch: int) -> Iterator[tuple[str, Shape]]:
    """SD1.x: depth 1, 1x1 conv projections (use_linear_in_transformer False)."""
    yield from _norm(f"{p}.norm", ch)
    yield from _conv(f"{p}.proj_in", ch, ch, 1)
    b = f"{p}.transformer_blocks.0"
    for attn, context in (("attn1", ch), ("attn2", CONTEXT_DIM)):
        yield from _linear(f"{b}.{attn}.to_q", ch, ch, bias=False)
        yield from _linear(f"{b}.{attn}.to_k", ch, context, bias=False)
        yield from _linear(f"{b}.{attn}.to_v", ch, context, bias=False)
        yield from _linear(f"{b}.{attn}.to_out.0", ch, ch)
    yield from _linear(f"{b}.ff.net.0.proj", ch * 8, ch)  # GEGLU: 2 x 4ch
    yield from _linear(f"{b}.ff.net.2", ch, ch * 4)
    for n in (1, 2, 3):
        yield from _norm(f"{b}.norm{n}", ch)
    yield from _conv(f"{p}.proj_out", ch, ch, 1)


def unet_shapes(prefix: str = "model.diffusion_model") -> Iterator[tuple[str, Shape]]:
    yield from _linear(f"{prefix}.time_embed.0", TIME_EMBED_DIM, MODEL_CHANNELS)
    yield from _linear(f"{prefix}.time_embed.2", TIME_EMBED_DIM, TIME_EMBED_DIM)
    yield from _conv(f"{prefix}.input_blocks.0.0", MODEL_CHANNELS, 4, 3)
    skips = [MODEL_CHANNELS]
    ch, block = MODEL_CHANNELS, 1
    for level, mult in enumerate(CHANNEL_MULT):
        for _ in range(NUM_RES_BLOCKS):
            p = f"{prefix}.input_blocks.{block}"
            yield from _res_block(f"{p}.0", ch, mult * MODEL_CHANNELS)
            ch = mult * MODEL_CHANNELS
            if level in ATTENTION_LEVELS:
                yield from _spatial_transformer(f"{p}.1", ch)
            skips.append(ch)
            block += 1
        if level != len(CHANNEL_MULT) - 1:
            yield from _conv(f"{prefix}.input_blocks.{block}.0.op", ch, ch, 3)
            skips.append(ch)
            block += 1
    yield from _res_block(f"{prefix}.middle_block.0", ch, ch)
    yield from _spatial_transformer(f"{prefix}.middle_block.1", ch)
    yield from _res_block(f"{prefix}.middle_block.2", ch, ch)
    block = 0
    for level, mult in reversed(list(enumerate(CHANNEL_MULT))):
        for i in range(NUM_RES_BLOCKS + 1):
            p = f"{prefix}.output_blocks.{block}"
            yield from _res_block(f"{p}.0", ch + skips.pop(), mult * MODEL_CHANNELS)
            ch = mult * MODEL_CHANNELS
            layer = 1
            if level in ATTENTION_LEVELS:
                yield from _spatial_transformer(f"{p}.1", ch)
                layer = 2
            if level and i == NUM_RES_BLOCKS:
                yield from _conv(f"{p}.{layer}.conv", ch, ch, 3)
            block += 1
    yield from _norm(f"{prefix}.out.0", ch)
    yield from _conv(f"{prefix}.out.2", 4, ch, 3)


# -- KL VAE (ldm.models.autoencoder.AutoencoderKL) --------------------------------------------------------

def _vae_res(p: str, c_in: int, c_out: int) -> Iterator[tuple[str, Shape]]:
    yield from _norm(f"{p}.norm1", c_in)
    yield from _conv(f"{p}.conv1", c_out, c_in, 3)
    yield from _norm(f"{p}.norm2", c_out)
    yield from _conv(f"{p}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        yield from _conv(f"{p}.nin_shortcut", c_out, c_in, 1)


def _vae_mid(p: str, ch: int) -> Iterator[tuple[str, Shape]]:
    yield from _vae_res(f"{p}.block_1", ch, ch)
    yield from _norm(f"{p}.attn_1.norm", ch)
    for name in ("q", "k", "v", "proj_out"):
        yield from _conv(f"{p}.attn_1.{name}", ch, ch, 1)
    yield from _vae_res(f"{p}.block_2", ch, ch)


def vae_shapes(prefix: str = "first_stage_model") -> Iterator[tuple[str, Shape]]:
    e = f"{prefix}.encoder"
    yield from _conv(f"{e}.conv_in", VAE_CH, 3, 3)
    ch = VAE_CH
    for level, mult in enumerate(VAE_CH_MULT):
        for i in range(VAE_RES_BLOCKS):
            yield from _vae_res(f"{e}.down.{level}.block.{i}", ch, mult * VAE_CH)
            ch = mult * VAE_CH
        if level != len(VAE_CH_MULT) - 1:
            yield from _conv(f"{e}.down.{level}.downsample.conv", ch, ch, 3)
    yield from _vae_mid(f"{e}.mid", ch)
    yield from _norm(f"{e}.norm_out", ch)
    yield from _conv(f"{e}.conv_out", 2 * Z_CHANNELS, ch, 3)
    d = f"{prefix}.decoder"
    ch = VAE_CH * VAE_CH_MULT[-1]
    yield from _conv(f"{d}.conv_in", ch, Z_CHANNELS, 3)
    yield from _vae_mid(f"{d}.mid", ch)
    for level in reversed(range(len(VAE_CH_MULT))):
        for i in range(VAE_RES_BLOCKS + 1):
            yield from _vae_res(f"{d}.up.{level}.block.{i}", ch, VAE_CH_MULT[level] * VAE_CH)
            ch = VAE_CH_MULT[level] * VAE_CH
        if level:
            yield from _conv(f"{d}.up.{level}.upsample.conv", ch, ch, 3)
    yield from _norm(f"{d}.norm_out", ch)
    yield from _conv(f"{d}.conv_out", 3, ch, 3)
    yield from _conv(f"{prefix}.quant_conv", 2 * Z_CHANNELS, 2 * Z_CHANNELS, 1)
    yield from _conv(f"{prefix}.post_quant_conv", Z_CHANNELS, Z_CHANNELS, 1)


# -- CLIP text encoder (transformers CLIPTextModel) -------------------------------------------------------

def clip_shapes(prefix: str = "cond_stage_model.transformer.text_model") -> Iterator[tuple[str, Shape]]:
    yield f"{prefix}.embeddings.token_embedding.weight", (CLIP_VOCAB, CLIP_WIDTH)
    yield f"{prefix}.embeddings.position_embedding.weight", (CLIP_POSITIONS, CLIP_WIDTH)
    for n in range(CLIP_LAYERS):
        p = f"{prefix}.encoder.layers.{n}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield from _linear(f"{p}.self_attn.{proj}", CLIP_WIDTH, CLIP_WIDTH)
        yield from _norm(f"{p}.layer_norm1", CLIP_WIDTH)
        yield from _linear(f"{p}.mlp.fc1", CLIP_MLP, CLIP_WIDTH)
        yield from _linear(f"{p}.mlp.fc2", CLIP_WIDTH, CLIP_MLP)
        yield from _norm(f"{p}.layer_norm2", CLIP_WIDTH)
    yield from _norm(f"{prefix}.final_layer_norm", CLIP_WIDTH)


def all_shapes() -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for name, shape in (*unet_shapes(), *vae_shapes(), *clip_shapes()):
        if name in shapes:
            raise AssertionError(f"duplicate key {name}")
        shapes[name] = shape
    return shapes


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers LatentDiffusion registers (ldm ``register_schedule``), as SD checkpoints carry them."""
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, TIMESTEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(), "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {k: v.float() for k, v in buffers.items()}


def random_tensor(name: str, shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """Norm layers: weight 1, bias 0. Embeddings: N(0, 0.02). Weights: N(0, 1/fan_in), so activations keep a
    unit scale through the depth and the outputs stay finite. Other biases: 0."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = ".norm" in name or "layer_norm" in name or name.endswith(("in_layers.0.weight", "out_layers.0.weight",
                                                                        "in_layers.0.bias", "out_layers.0.bias",
                                                                        "out.0.weight", "out.0.bias"))
    if len(shape) == 1:
        return torch.ones(shape) if is_norm and leaf == "weight" else torch.zeros(shape)
    if "embedding" in name:
        return torch.randn(shape, generator=generator) * 0.02
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def make_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {name: random_tensor(name, shape, generator).to(dtype) for name, shape in all_shapes().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(CLIP_POSITIONS)[None]
    state.update(schedule_buffers())
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error("the checkpoint must be a .safetensors file")
    from safetensors.torch import save_file

    state = make_state_dict(args.seed, getattr(torch, args.dtype))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"format": "pt", "dps_guidance": f"random SD1.5, seed {args.seed}"})
    total = sum(t.numel() for t in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {total / 1e6:.1f} M values, {args.dtype}")


if __name__ == "__main__":
    main()
