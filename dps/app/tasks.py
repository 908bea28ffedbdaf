"""The restoration tasks of the demo, the command line and the benchmarks, from the operator registry.

A task is an operator (``dps.operators.registry``) with a test protocol (``dps.operators.spec.Task``): the
paper's settings (Chung et al. 2023, official configs at 256 px) scaled to the image side ``s`` by each spec.
Today's tasks: super-resolution x4 (bicubic); a box of half the side with a margin of s/16; 70 % of pixels
missing at random; Gaussian blur σ = max(1.5, 3·s/256) px; motion blur of side max(9, 61·s/256) px with
intensity 0.5; phase retrieval with oversampling 2; and colourisation, outside the demo.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..operators import Operator, registry
from ..operators.spec import OperatorSpec, Param

TASKS = tuple(task.name for _, task in registry.tasks(demo_only=True))

# Option names kept from before the registry (scripts use them); other parameters get ``--<name>``, or
# ``--<operator>-<name>`` where that is taken by another option or another kind of value.
LEGACY_OPTIONS = {("gaussian_blur", "sigma"): "blur-sigma", ("motion_blur", "seed"): "kernel-seed"}
OPTIONS_KEY = "operator_options"


def task_names() -> tuple[str, ...]:
    """Every registered task, the demo's and the others (``restore --task`` choices)."""
    return tuple(task.name for _, task in registry.tasks())


def make_operator(task: str, shape: tuple[int, ...], seed: int = 0, **params: Any) -> Operator:
    """The operator of ``task`` for a batch of ``shape`` (B, C, H, W): the task's protocol drawn with ``seed``
    (masks differ per image), the rest scaled to the image; ``params`` override by name."""
    _, protocol = registry.find_task(task)
    drawn = protocol.draw(tuple(shape), seed) if protocol.draw is not None else {}
    return operator_for(task, shape, {**drawn, **params})


def operator_for(task: str, shape: tuple[int, ...], params: dict[str, Any]) -> Operator:
    """The operator of ``task`` for images of ``shape``: ``params`` by name, the rest scaled to the image side."""
    spec, _ = registry.find_task(task)
    return spec.factory(**spec.resolve(params, side=min(shape[-2:])))


def image_size(task: str, measurement_hw: tuple[int, int], params: dict[str, Any]) -> tuple[int, int]:
    """(H, W) of the image behind a measurement of ``measurement_hw`` (``params`` as for ``operator_for``)."""
    spec, _ = registry.find_task(task)
    return spec.image_size(*measurement_hw, **spec.resolve(params, side=min(measurement_hw), partial=True))


def measurement_size(task: str, image_hw: tuple[int, int], params: dict[str, Any]) -> tuple[int, int]:
    """(h, w) of the measurement of an image of ``image_hw``."""
    spec, _ = registry.find_task(task)
    return spec.measurement_size(*image_hw, **spec.resolve(params, side=min(image_hw), partial=True))


# -- command-line options ---------------------------------------------------------------------------------

def _options(taken: set[str]) -> dict[str, list[tuple[OperatorSpec, Param]]]:
    """Option name -> the (spec, parameter) pairs it sets: one option per parameter name and kind."""
    options: dict[str, list[tuple[OperatorSpec, Param]]] = {}
    for spec in registry.specs():
        for param in spec.params:
            name = LEGACY_OPTIONS.get((spec.name, param.name), param.name.replace("_", "-"))
            owners = options.get(name, [])
            if name in taken or (owners and owners[0][1].kind != param.kind):
                name = f"{spec.name}-{param.name}".replace("_", "-")
            options.setdefault(name, []).append((spec, param))
    return options


def _default(owners: list[tuple[OperatorSpec, Param]]) -> Any:
    """The option's default: the parameter's, unless it is scaled to the image or the operators differ (None:
    each operator fills in its own)."""
    defaults = {repr(p.default) for _, p in owners}
    scaled = any(s.sized_defaults is not None and p.name in s.sized_defaults(256, {}) for s, p in owners)
    return owners[0][1].default if len(defaults) == 1 and not scaled else None


def add_operator_options(parser: argparse.ArgumentParser) -> None:
    """One option per operator parameter (``--factor``, ``--mask FILE``, ...), help and defaults from the
    registry, added after the parser's own options; ``operator_params`` reads them back."""
    taken = {s.lstrip("-") for action in parser._actions for s in action.option_strings}
    dests = {}
    for name, owners in _options(taken).items():
        param, default = owners[0][1], _default(owners)
        kind = {"int": {"type": int}, "float": {"type": float}, "choice": {"choices": param.choices}}.get(
            param.kind, {"type": Path, "metavar": "FILE"})
        if param.is_tensor:
            note = "an image file" + (", optional" if param.optional else "")
        else:
            note = "default: scaled to the image" if default is None else f"default: {default}"
        where = ", ".join(dict.fromkeys(t.name for spec, _ in owners for t in spec.tasks))
        dest = name.replace("-", "_")
        text = f"{param.help} ({note}) [{where}]".replace("%", "%%")  # argparse formats help with %
        parser.add_argument(f"--{name}", dest=dest, default=default, help=text, **kind)
        dests[dest] = [(spec.name, p.name) for spec, p in owners]
    parser.set_defaults(**{OPTIONS_KEY: dests})


def operator_params(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The parameters of ``task``'s operator given on the command line, by the operator's names (file paths
    for masks and images)."""
    spec, _ = registry.find_task(task)
    given = {}
    for dest, owners in getattr(args, OPTIONS_KEY, {}).items():
        value = getattr(args, dest, None)
        for operator, param in owners:
            if operator == spec.name and value is not None:
                given[param] = value
    return given
