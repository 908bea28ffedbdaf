"""The user's DPS settings in the WebUI: one dataclass, its positional argument order (the order of the
script's gradio components, and of ``alwayson_scripts`` args in the API), the infotext string, and the
core objects they build. Host-free: imports torch and ``dps`` only.

The tasks are the registered operators (``dps.operators.registry``) and their parameters are settings: the
parameters the WebUI had before the registry keep their names and places (``LEGACY_FIELDS``); the parameters of
any other operator become settings named ``<operator>_<parameter>``, appended after all fixed settings when the
WebUI loads this module, so positional args and infotexts of earlier images keep working.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, make_dataclass

import torch

from dps import noise as dps_noise
from dps import operators as ops
from dps.guidance import MODES, RULES
from dps.host import HOST_RULE, HOST_ZETA
from dps.operators import registry
from dps.operators.spec import OperatorSpec, Param
from dps.vae_gradient import VAE_GRADIENTS

NOISES = ("gaussian", "poisson", "noiseless")
SOURCES = ("init image", "upload")
INFOTEXT_KEY = "DPS"
NOTE_KEY = "DPS note"
# Setting names of operator parameters from before the registry (API args, infotexts); blur_kernel is shared.
LEGACY_FIELDS = {("super_resolution", "factor"): "sr_factor", ("super_resolution", "filter"): "sr_filter",
                 ("gaussian_blur", "kernel_size"): "blur_kernel", ("motion_blur", "kernel_size"): "blur_kernel",
                 ("gaussian_blur", "sigma"): "blur_sigma", ("motion_blur", "intensity"): "motion_intensity",
                 ("motion_blur", "seed"): "motion_seed", ("phase_retrieval", "oversample"): "phase_oversample"}
_TYPES = {"int": int, "float": float, "choice": str}


def webui_specs() -> tuple[OperatorSpec, ...]:
    """The operators the WebUI offers: those whose parameters it can show (numbers, choices, a mask; an image
    only when it is optional, and then it is left out)."""
    return tuple(s for s in registry.specs() if all(p.kind != "image" or p.optional for p in s.params))


def setting_name(spec: OperatorSpec, param: Param) -> str:
    return LEGACY_FIELDS.get((spec.name, param.name), f"{spec.name}_{param.name}")


def operator_settings() -> dict[str, Param]:
    """Setting name -> its parameter (the first operator's, for a shared setting), in menu order."""
    out: dict[str, Param] = {}
    for spec in webui_specs():
        for param in spec.params:
            if not param.is_tensor:
                out.setdefault(setting_name(spec, param), param)
    return out


def needs_mask(task: str) -> bool:
    return any(p.kind == "mask" for p in registry.get(task).params)


def _default(operator: str, name: str):
    return registry.get(operator).param(name).default


TASKS = tuple(s.name for s in webui_specs())
OPERATOR_SETTINGS = operator_settings()


@dataclass
class DPSSettings:
    """Everything the accordion sets. Field order is the positional argument order (``ARG_NAMES``)."""

    enabled: bool = False
    task: str = "super_resolution"
    sr_factor: int = _default("super_resolution", "factor")
    sr_filter: str = _default("super_resolution", "filter")
    blur_kernel: int = _default("gaussian_blur", "kernel_size")
    blur_sigma: float = _default("gaussian_blur", "sigma")
    motion_intensity: float = _default("motion_blur", "intensity")
    motion_seed: int = _default("motion_blur", "seed")
    phase_oversample: float = _default("phase_retrieval", "oversample")
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
        for name, choices in (("task", TASKS), ("source", SOURCES), ("noise", NOISES), ("rule", RULES),
                              ("mode", MODES), ("vae_gradient", VAE_GRADIENTS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"DPS: {name} must be one of {choices}, got {value!r}")
        for name, param in OPERATOR_SETTINGS.items():
            setattr(self, name, _check_setting(name, param, getattr(self, name)))
        for name in ("noise_sigma", "poisson_rate", "zeta", "start", "end"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"DPS: {name} must be a finite number, got {value!r}")
            setattr(self, name, value)
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


def _check_setting(name: str, param: Param, value):
    """An operator setting as its type; whole numbers not below the widget's minimum."""
    try:
        if param.kind in ("int", "float") and isinstance(value, str):  # API clients may send numbers as text
            value = float(value)
        if param.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        value = param.check(value)
    except (TypeError, ValueError):
        kind = {"int": "a whole number", "float": "a finite number"}.get(param.kind, f"one of {param.choices}")
        raise ValueError(f"DPS: {name} must be {kind}, got {value!r}") from None
    if param.kind == "int" and param.min is not None and value < param.min:
        raise ValueError(f"DPS: {name} ({param.label}) must be >= {param.min:g}, got {value}")
    return value


def _with_new_operator_fields(cls: type) -> type:
    """``cls`` with one more setting per parameter of operators without a fixed setting, after all the others
    (so earlier positional args keep their places); ``cls`` itself when there are none."""
    names = {f.name for f in fields(cls)}
    extra = [(n, _TYPES[p.kind], field(default=p.default)) for n, p in OPERATOR_SETTINGS.items() if n not in names]
    if not extra:
        return cls
    return make_dataclass(cls.__name__, extra, bases=(cls,), namespace={"__doc__": cls.__doc__,
                                                                         "__module__": cls.__module__})


DPSSettings = _with_new_operator_fields(DPSSettings)
ARG_NAMES = tuple(f.name for f in fields(DPSSettings))
DEFAULTS = DPSSettings()
TASK_PARAMS = {spec.name: tuple(dict.fromkeys(setting_name(spec, p) for p in spec.params if not p.is_tensor))
               for spec in webui_specs()}
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


def operator_values(settings: DPSSettings) -> dict:
    """The task's operator parameters (numbers and choices) by the operator's names."""
    spec = registry.get(settings.task)
    return {p.name: getattr(settings, setting_name(spec, p)) for p in spec.params if not p.is_tensor}


def build_operator(settings: DPSSettings, mask: torch.Tensor | None = None) -> ops.Operator:
    """The forward model ``A`` the settings name; an operator with a mask (inpainting) needs ``mask`` (1 = missing)."""
    if settings.task not in TASKS:
        raise ValueError(f"DPS: unknown task {settings.task!r}; choose one of {', '.join(TASKS)}")
    spec, values = registry.get(settings.task), operator_values(settings)
    for p in spec.params:
        if p.kind == "mask" and mask is None and not p.optional:
            raise ValueError(f"DPS {spec.display_name.lower()} needs a mask: draw one in img2img's Inpaint tab, or "
                             "upload one in the DPS accordion (white = missing)")
        if p.kind == "mask":
            values[p.name] = mask
    return spec.build(**values)


def build_noise(settings: DPSSettings) -> dps_noise.NoiseModel:
    if settings.noise == "gaussian":
        return dps_noise.Gaussian(settings.noise_sigma)
    if settings.noise == "poisson":
        return dps_noise.Poisson(settings.poisson_rate)
    return dps_noise.Noiseless()


def replace(settings: DPSSettings, **changes) -> DPSSettings:
    return dataclasses.replace(settings, **changes)
