"""The user's DPS settings in the WebUI: one dataclass, its positional argument order (the order of the
script's gradio components, and of ``alwayson_scripts`` args in the API), the infotext string, and the
core objects they build. Host-free: imports torch and ``dps`` only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch

from dps import noise as dps_noise
from dps import operators as ops
from dps.guidance import MODES, RULES
from dps.host import HOST_RULE, HOST_ZETA
from dps.vae_gradient import VAE_GRADIENTS

TASKS = ("super_resolution", "inpainting", "gaussian_blur", "motion_blur", "grayscale", "phase_retrieval")
NOISES = ("gaussian", "poisson", "noiseless")
SOURCES = ("init image", "upload")
SR_FILTERS = ("bicubic", "bilinear", "area")
INFOTEXT_KEY = "DPS"
NOTE_KEY = "DPS note"


@dataclass
class DPSSettings:
    """Everything the accordion sets. Field order is the positional argument order (``ARG_NAMES``)."""

    enabled: bool = False
    task: str = "super_resolution"
    sr_factor: int = 4
    sr_filter: str = "bicubic"
    blur_kernel: int = 61
    blur_sigma: float = 3.0
    motion_intensity: float = 0.5
    motion_seed: int = 0
    phase_oversample: float = 2.0
    source: str = "init image"
    image: object = None  # uploaded measurement (PIL image, numpy array, base64 string)
    mask: object = None  # uploaded inpainting mask, white = missing
    simulate: bool = False  # the image is clean: make y = A(x) + noise from it
    noise: str = "gaussian"
    noise_sigma: float = 0.05
    poisson_rate: float = 1.0
    zeta: float = HOST_ZETA
    rule: str = HOST_RULE
    mode: str = "full"
    start: float = 0.0
    end: float = 1.0
    vae_gradient: str = "auto"   # dps.vae_gradient: auto, full, checkpointed, tiled

    def __post_init__(self) -> None:
        self.enabled = bool(self.enabled)
        self.simulate = bool(self.simulate)
        for name, choices in (("task", TASKS), ("sr_filter", SR_FILTERS), ("source", SOURCES), ("noise", NOISES),
                              ("rule", RULES), ("mode", MODES), ("vae_gradient", VAE_GRADIENTS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"DPS: {name} must be one of {choices}, got {value!r}")
        for name in ("sr_factor", "blur_kernel", "motion_seed"):
            value = getattr(self, name)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"DPS: {name} must be a whole number, got {value!r}")
            setattr(self, name, int(value))
        for name in ("blur_sigma", "motion_intensity", "phase_oversample", "noise_sigma", "poisson_rate", "zeta",
                     "start", "end"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"DPS: {name} must be a finite number, got {value!r}")
            setattr(self, name, value)
        if self.sr_factor < 1:
            raise ValueError(f"DPS: the super-resolution factor must be >= 1, got {self.sr_factor}")
        if self.zeta < 0:
            raise ValueError(f"DPS: strength zeta must be >= 0, got {self.zeta}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"DPS: need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")

    @classmethod
    def from_args(cls, args) -> "DPSSettings":
        """From the script's positional args, or from one dict (``{"enabled": true, "task": ...}``, handy
        in the API's ``alwayson_scripts``); missing trailing args keep their defaults."""
        args = list(args)
        if args and isinstance(args[0], dict):
            unknown = set(args[0]) - set(ARG_NAMES)
            if unknown:
                raise ValueError(f"DPS: unknown setting(s) {sorted(unknown)}; valid names: {list(ARG_NAMES)}")
            return cls(**args[0])
        if len(args) > len(ARG_NAMES):
            raise ValueError(f"DPS: got {len(args)} args, expected at most {len(ARG_NAMES)}: {list(ARG_NAMES)}")
        return cls(**dict(zip(ARG_NAMES, args)))

    def to_infotext(self, y_hash: str | None = None) -> str:
        """One compound value for ``p.extra_generation_params["DPS"]`` (no commas inside values)."""
        items = [("task", self.task)]
        items += [(k, getattr(self, k)) for k in TASK_PARAMS[self.task]]
        items += [("noise", self.noise)] + [(k, getattr(self, k)) for k in NOISE_PARAMS[self.noise]]
        items += [("zeta", self.zeta), ("rule", self.rule), ("mode", self.mode), ("start", self.start),
                  ("end", self.end), ("source", self.source)]
        if self.vae_gradient != "auto":
            items.append(("vae_gradient", self.vae_gradient))
        if self.simulate:
            items.append(("simulate", True))
        if y_hash:
            items.append(("y", y_hash))
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in items)


ARG_NAMES = tuple(f.name for f in fields(DPSSettings))
DEFAULTS = DPSSettings()
TASK_PARAMS = {
    "super_resolution": ("sr_factor", "sr_filter"),
    "inpainting": (),
    "gaussian_blur": ("blur_kernel", "blur_sigma"),
    "motion_blur": ("blur_kernel", "motion_intensity", "motion_seed"),
    "grayscale": (),
    "phase_retrieval": ("phase_oversample",),
}
NOISE_PARAMS = {"gaussian": ("noise_sigma",), "poisson": ("poisson_rate",), "noiseless": ()}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_infotext(text: str | None) -> dict:
    """Inverse of ``DPSSettings.to_infotext``: a dict of typed values keyed by ``ARG_NAMES`` (plus ``y``).
    Unknown keys and unparsable values are dropped, so an infotext from a newer version still pastes."""
    if not text:
        return {}
    types = {f.name: type(getattr(DEFAULTS, f.name)) for f in fields(DPSSettings)}
    out: dict = {}
    for part in str(text).split(","):
        key, sep, value = part.partition(":")
        key, value = key.strip(), value.strip()
        if not sep:
            continue
        if key == "y":
            out["y"] = value
            continue
        kind = types.get(key)
        if kind is None or key in ("image", "mask", "enabled"):
            continue
        try:
            out[key] = (value == "True") if kind is bool else kind(float(value)) if kind is int else kind(value)
        except ValueError:
            continue
    return out


def build_operator(settings: DPSSettings, mask: torch.Tensor | None = None) -> ops.Operator:
    """The forward model ``A`` the settings name; inpainting needs ``mask`` (1 = missing)."""
    task = settings.task
    if task == "super_resolution":
        return ops.SuperResolution(factor=settings.sr_factor, filter=settings.sr_filter)
    if task == "inpainting":
        if mask is None:
            raise ValueError("DPS inpainting needs a mask: draw one in img2img's Inpaint tab, or upload one in the "
                             "DPS accordion (white = missing)")
        return ops.Inpainting(mask)
    if task == "gaussian_blur":
        return ops.GaussianBlur(kernel_size=settings.blur_kernel, sigma=settings.blur_sigma)
    if task == "motion_blur":
        return ops.MotionBlur(kernel_size=settings.blur_kernel, intensity=settings.motion_intensity,
                              seed=settings.motion_seed)
    if task == "grayscale":
        return ops.Grayscale()
    return ops.PhaseRetrieval(oversample=settings.phase_oversample)


def build_noise(settings: DPSSettings) -> dps_noise.NoiseModel:
    if settings.noise == "gaussian":
        return dps_noise.Gaussian(settings.noise_sigma)
    if settings.noise == "poisson":
        return dps_noise.Poisson(settings.poisson_rate)
    return dps_noise.Noiseless()


def replace(settings: DPSSettings, **changes) -> DPSSettings:
    return dataclasses.replace(settings, **changes)
