"""X/Y/Z plot axes for the DPS settings (AUTOMATIC1111 and Forge's built-in ``xyz_grid`` script).

The WebUI has no registry for extension axes; extensions append ``AxisOption`` entries to the ``axis_options``
list of the loaded ``xyz_grid.py`` module, found through ``modules.scripts.scripts_data``, from an
``on_before_ui`` callback (by then every script is loaded). Each axis stores its value in
``p.dps_overrides``; the script applies the overrides on top of the accordion's settings in ``process``.
Nothing here imports a host: the xyz module and the scripts list are passed in.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from dps.guidance import MODES, RULES

OVERRIDES_ATTR = "dps_overrides"
LABEL_PREFIX = "[DPS] "
# (setting, axis label, value type, choices)
AXES: tuple[tuple[str, str, type, tuple[str, ...] | None], ...] = (
    ("zeta", "Strength zeta", float, None),
    ("rule", "Step rule", str, RULES),
    ("mode", "Gradient", str, MODES),
    ("start", "Guidance start", float, None),
    ("end", "Guidance end", float, None),
)


def find_xyz_module(scripts_data: Iterable[Any]) -> Any | None:
    """The module object of the loaded ``xyz_grid.py`` script, or None (not installed, or another layout)."""
    for entry in scripts_data:
        cls = getattr(entry, "script_class", None)
        if getattr(cls, "__module__", None) == "xyz_grid.py":
            module = getattr(entry, "module", None)
            if hasattr(module, "AxisOption") and hasattr(module, "axis_options"):
                return module
    return None


def override_setter(name: str) -> Callable[[Any, Any, Any], None]:
    """An ``AxisOption.apply(p, x, xs)`` that records ``name = x`` for this cell's processing object."""
    def apply(p: Any, x: Any, xs: Any) -> None:
        overrides = dict(getattr(p, OVERRIDES_ATTR, None) or {})  # a copy: grid cells share the dict otherwise
        overrides[name] = x
        setattr(p, OVERRIDES_ATTR, overrides)
    return apply


def add_axes(xyz_module: Any | None) -> int:
    """Append the DPS axes to ``xyz_module.axis_options`` once; returns how many were added (0 without a module)."""
    if xyz_module is None:
        return 0
    present = {getattr(option, "label", None) for option in xyz_module.axis_options}
    added = 0
    for name, label, kind, choices in AXES:
        if LABEL_PREFIX + label in present:
            continue
        kwargs = {"choices": (lambda c=choices: list(c))} if choices else {}
        xyz_module.axis_options.append(xyz_module.AxisOption(LABEL_PREFIX + label, kind, override_setter(name), **kwargs))
        added += 1
    return added


def overrides_of(p: Any) -> dict[str, Any]:
    """The axis values recorded on ``p`` (empty outside an X/Y/Z plot)."""
    return dict(getattr(p, OVERRIDES_ATTR, None) or {})
