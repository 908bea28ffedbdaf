"""Declarative descriptions of the operators, from which every host renders its controls.

An ``OperatorSpec`` says what an operator is called, what it does, what its measurement ``y = A(x)`` looks
like, which parameters it takes (type, default, widget range, help text with units) and how to build it. The
ComfyUI nodes, the WebUI's task list and controls, the command line and the demo are generated from the specs
in ``dps.operators.registry``; a new operator is one module in ``dps/operators`` that defines ``SPECS``.

Parameter values in the core's terms: ``int``/``float`` numbers, ``choice`` one of the strings in ``choices``,
``mask`` a tensor with 1 = missing ((H, W) or (B, 1, H, W)), ``image`` an NCHW batch in [-1, 1]. Each host
converts its own types (a ComfyUI MASK, an uploaded file) to these before calling ``OperatorSpec.build``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from ..validate import check_choice, check_int, check_number, check_tensor
from .base import Operator

KINDS = ("int", "float", "choice", "mask", "image")
TENSOR_KINDS = ("mask", "image")


@dataclass(frozen=True)
class Param:
    """One parameter of an operator, named as the operator's constructor keyword.

    ``min``/``max``/``step`` are the widget range hosts show; validity is the operator's own check. ``help``
    is one or two sentences with the units (a tooltip); ``label`` a short form label. ``optional`` is for
    ``mask``/``image`` parameters that may be left out (numbers and choices always have a default).
    """

    name: str
    kind: Literal["int", "float", "choice", "mask", "image"]
    help: str
    label: str = ""
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.kind not in KINDS or not self.help:
            raise ValueError(f"parameter {self.name!r}: needs an identifier name, a kind in {KINDS} and help text")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"parameter {self.name!r}: a choice needs choices")
        if self.kind in TENSOR_KINDS:
            if self.default is not None:
                raise ValueError(f"parameter {self.name!r}: a {self.kind} has no default; set optional=True instead")
        else:
            if self.optional:
                raise ValueError(f"parameter {self.name!r}: a {self.kind} is never optional; give it a default")
            self.check(self.default)
        if not self.label:
            object.__setattr__(self, "label", self.name.replace("_", " ").capitalize())

    @property
    def is_tensor(self) -> bool:
        return self.kind in TENSOR_KINDS

    def check(self, value: Any) -> Any:
        """``value`` as this parameter's type (``int``, ``float``, a choice, a tensor); ``TypeError`` or
        ``ValueError`` naming the parameter otherwise (``dps.validate``)."""
        if self.kind == "choice":
            return check_choice(self.name, value, self.choices)
        if self.is_tensor:
            return None if value is None and self.optional else check_tensor(self.name, value)
        return check_int(self.name, value) if self.kind == "int" else check_number(self.name, value)


def _same_size(h: int, w: int, **params: Any) -> tuple[int, int]:
    return h, w


@dataclass(frozen=True)
class Task:
    """A named, seeded recipe that draws an operator's parameters for a batch of test images: the paper's
    experimental protocols (a random box, 70 % of pixels missing, a blur scaled to the image), used by the demo,
    the benchmarks and the command line.

    ``draw(shape, seed)`` returns parameter values for a batch of ``shape`` (B, C, H, W); the rest come from the
    spec's defaults for the image size. ``demo``: the demo restores it by default.
    """

    name: str
    draw: Callable[[tuple[int, ...], int], dict[str, Any]] | None = None
    demo: bool = True


@dataclass(frozen=True)
class OperatorSpec:
    """Everything a host needs to offer an operator.

    Args:
        name: the registry key (``snake_case``), e.g. ``"super_resolution"``; ComfyUI's node id is
            ``"DPS" + CamelCase(name)``, the WebUI's task is ``name``.
        display_name: a title, e.g. ``"Super-Resolution"``.
        description: what the operator is for, one or two sentences for users.
        measurement: what ``y`` looks like, e.g. "the picture shrunk by factor: 1/factor of its width and height".
        params: the parameters, in the order hosts show them.
        factory: builds the operator from all parameter values (keywords); often the operator class itself.
        aliases: words users search for (upscale, deblur, restore, inpaint, sketch, ...).
        experimental: a research task, flagged as such in hosts that can.
        from_picture: how a host turns a picture the user gives into ``y``: ``"resize"`` (``y`` is a picture of
            the measurement's size: resize it to that), ``"apply"`` (``A`` only removes information, so ``y =
            A(picture)``), or ``None`` (``y`` is not a picture; it has to be simulated from a clean one).
        measurement_size / image_size: ``(h, w)`` of ``y`` for an image of ``(h, w)``, and back; both receive
            the parameter values as keywords. Default: the same size.
        sized_defaults: ``(side, values) -> dict`` of defaults scaled to an image of side ``side`` px for the
            parameters not in ``values`` (the paper's settings are for 256 px); ``None``: the fixed defaults.
        tasks: the test protocols (``Task``); default one task named ``name`` with the default parameters.
        order: position in menus (built-ins 10-60; new operators default to after them).
    """

    name: str
    display_name: str
    description: str
    measurement: str
    params: tuple[Param, ...]
    factory: Callable[..., Operator]
    aliases: tuple[str, ...] = ()
    experimental: bool = False
    from_picture: Literal["resize", "apply"] | None = "resize"
    measurement_size: Callable[..., tuple[int, int]] = _same_size
    image_size: Callable[..., tuple[int, int]] = _same_size
    sized_defaults: Callable[[int, Mapping[str, Any]], dict[str, Any]] | None = None
    tasks: tuple[Task, ...] | None = None
    order: float = 100.0
    _by_name: dict[str, Param] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.name.isidentifier() and self.name.islower()):
            raise ValueError(f"operator name {self.name!r} must be a snake_case identifier")
        if self.from_picture not in ("resize", "apply", None):
            raise ValueError(f"{self.name}: from_picture must be 'resize', 'apply' or None")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: parameter names must be unique, got {names}")
        object.__setattr__(self, "_by_name", {p.name: p for p in self.params})
        if self.tasks is None:
            object.__setattr__(self, "tasks", (Task(self.name),))

    @property
    def node_id(self) -> str:
        """ComfyUI's node id: ``DPS`` + the name in CamelCase (``gaussian_blur`` -> ``DPSGaussianBlur``)."""
        return "DPS" + "".join(part.capitalize() for part in self.name.split("_"))

    def param(self, name: str) -> Param:
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"{self.name} has no parameter {name!r}; its parameters: {list(self._by_name)}") from None

    def resolve(self, values: Mapping[str, Any], side: int | None = None, partial: bool = False) -> dict[str, Any]:
        """Every parameter's value: ``values`` checked, the rest from the defaults, scaled to an image of side
        ``side`` px where the spec says how. ``ValueError`` for an unknown name or a missing required mask/image
        (``partial``: left as ``None``, for sizes and forms that do not need it)."""
        for name in values:
            self.param(name)
        given = {name: self.param(name).check(value) for name, value in values.items()}
        if side is not None and self.sized_defaults is not None:
            given = {**{k: self.param(k).check(v) for k, v in self.sized_defaults(int(side), given).items()}, **given}
        out = {}
        for p in self.params:
            if p.name in given:
                out[p.name] = given[p.name]
            elif p.is_tensor and not p.optional and not partial:
                raise ValueError(f"{self.name} needs its {p.kind} {p.name!r}: {p.help}")
            else:
                out[p.name] = p.default
        return out

    def build(self, **values: Any) -> Operator:
        """The operator for ``values`` (missing ones take their defaults)."""
        return self.factory(**self.resolve(values))

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ValueError(f"{self.name} has no task {name!r}; its tasks: {[t.name for t in self.tasks]}")
