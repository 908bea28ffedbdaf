"""Turn what the user gave (an uploaded or img2img image, a mask) into the measurement ``y`` and the
inpainting mask, at the size the sampler generates. Host-free: torch, numpy, and PIL only when a
base64 string has to be decoded (the WebUI ships PIL).
"""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import torch
import torch.nn.functional as F

from dps.operators import Operator, registry

from .settings import DPSSettings, operator_values


def decode_image(value):
    """PIL image / numpy array / base64 string (API) / gradio-3 sketch dict -> PIL image or array."""
    if value is None:
        return None
    if isinstance(value, dict):  # gradio 3 "sketch" images: {"image": ..., "mask": ...}
        return decode_image(value.get("image"))
    if isinstance(value, str):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as e:
            raise ValueError("DPS: the measurement image string is not valid base64; send a PNG as base64") from e
        from PIL import Image  # the WebUI ships PIL; only the API path needs it
        return Image.open(io.BytesIO(raw))
    return value


def image_to_tensor(image, channels: int = 3) -> torch.Tensor:
    """(1, C, H, W) float in [-1, 1] from a PIL image or an HxW[xC] uint8/float array in [0, 255]/[0, 1]."""
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB" if channels == 3 else "L")
    a = np.asarray(image)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"DPS: expected an HxW or HxWxC image, got an array of shape {a.shape}")
    if a.shape[2] == 4:
        a = a[..., :3]
    if channels == 3 and a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if channels == 1 and a.shape[2] == 3:
        a = a.mean(axis=2, keepdims=True)
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None]
    return t * 2.0 - 1.0


def resize(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize (a no-op at the same size)."""
    if tuple(t.shape[-2:]) == (height, width):
        return t
    return F.interpolate(t, size=(height, width), mode="bicubic", antialias=True, align_corners=False)


def mask_to_tensor(mask, height: int, width: int, invert: bool = False) -> torch.Tensor:
    """(1, 1, H, W) binary mask, 1 = missing (white in the WebUI's inpaint mask)."""
    m = (image_to_tensor(decode_image(mask), channels=1) + 1) / 2
    m = F.interpolate(m, size=(height, width), mode="nearest") if tuple(m.shape[-2:]) != (height, width) else m
    m = (m > 0.5).float()
    return 1.0 - m if invert else m


def make_measurement(settings: DPSSettings, operator: Operator, image: torch.Tensor, height: int, width: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The measurement ``y`` for images of (height, width), from ``image`` in [-1, 1].

    ``settings.simulate``: the image is clean; y = A(image) + noise. Otherwise the image *is* the degraded
    observation, as the operator's spec says (``from_picture``): resized to the measurement's size
    (super-resolution, blurs), or with A applied (inpainting, grayscale: A only zeroes the holes / takes the
    luma, so it is idempotent); an operator whose measurement is no picture (phase retrieval) needs simulate.
    """
    shape = (1, 3, height, width)
    spec = registry.get(settings.task)
    if settings.simulate:
        from .settings import build_noise
        with torch.no_grad():
            y = build_noise(settings).sample(operator(resize(image, height, width)), generator)
    elif spec.from_picture == "resize":
        y = resize(image, *spec.measurement_size(height, width, **operator_values(settings)))
    elif spec.from_picture == "apply":
        with torch.no_grad():
            y = operator(resize(image, height, width))
    else:
        raise ValueError(f"DPS: a {spec.display_name.lower()} measurement ({spec.measurement}) cannot be given as an "
                         "image; tick 'image is clean, simulate the measurement' to make y = A(x) from a clean image")
    operator.check_measurement(y, shape)
    return y.detach()


def measurement_hash(y: torch.Tensor) -> str:
    """A short hash of y for the infotext (the measurement itself cannot live in a PNG)."""
    return hashlib.sha256(y.detach().float().cpu().numpy().tobytes()).hexdigest()[:10]
