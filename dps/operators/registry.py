"""The operator registry: every ``OperatorSpec`` by name, in menu order.

Specs live beside their operators: each module of ``dps.operators`` may define ``SPECS`` (a tuple of
``OperatorSpec``); the registry imports every module of the package once, on first use, and collects them. So a
new operator is one file in ``dps/operators``, and every host lists it. ``register`` adds a spec from elsewhere
(a plugin, a test); an unknown or duplicate name is a ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .spec import OperatorSpec, Task

REGISTRY: dict[str, OperatorSpec] = {}
_discovered: list[bool] = []


def register(spec: OperatorSpec) -> OperatorSpec:
    """Add ``spec``; its name and its task names must be new."""
    if not isinstance(spec, OperatorSpec):
        raise ValueError(f"register takes an OperatorSpec, got {type(spec).__name__}")
    taken = {t.name for s in REGISTRY.values() for t in s.tasks}
    clash = {t.name for t in spec.tasks} & taken
    if spec.name in REGISTRY or clash:
        raise ValueError(f"operator {spec.name!r} is already registered or reuses the task names {sorted(clash)}")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove the spec ``name`` (tests that registered a toy operator)."""
    get(name)
    del REGISTRY[name]


def _discover() -> None:
    """Import every module of this package once and register the ``SPECS`` each defines."""
    if _discovered:
        return
    _discovered.append(True)
    package = __name__.rsplit(".", 1)[0]
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        for spec in getattr(module, "SPECS", ()):
            if REGISTRY.get(spec.name) is not spec:
                register(spec)


def specs() -> tuple[OperatorSpec, ...]:
    """All specs, in menu order (``OperatorSpec.order``, then name)."""
    _discover()
    return tuple(sorted(REGISTRY.values(), key=lambda s: (s.order, s.name)))


def names() -> tuple[str, ...]:
    return tuple(s.name for s in specs())


def get(name: str) -> OperatorSpec:
    """The spec ``name``; ``ValueError`` listing the registered names otherwise."""
    _discover()
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown operator {name!r}; choose one of {', '.join(names())}") from None


def tasks(demo_only: bool = False) -> tuple[tuple[OperatorSpec, Task], ...]:
    """Every (spec, task) pair in menu order; ``demo_only``: those the demo restores by default."""
    return tuple((s, t) for s in specs() for t in s.tasks if t.demo or not demo_only)


def find_task(name: str) -> tuple[OperatorSpec, Task]:
    """The spec and task called ``name``; ``ValueError`` listing the task names otherwise."""
    for spec, task in tasks():
        if task.name == name:
            return spec, task
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(t.name for _, t in tasks())}")
