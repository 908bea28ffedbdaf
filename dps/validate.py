"""Argument checks shared by the core and the application: every public entry point refuses bad input
before any work starts, with a ``TypeError`` (wrong kind of value) or a ``ValueError`` (wrong value) whose
message names the argument and the fix.

Each helper returns the checked value (converted to ``int``/``float`` where that is the point), so a caller
writes ``steps = check_int("steps", steps, minimum=1)``. ``name`` is what the user typed: a keyword for the
library (``"steps"``), an option for the command line (``"--steps"``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import torch


def _kind(value: Any) -> str:
    """The type of ``value`` as a user reads it: ``str``, ``numpy.ndarray``, ``None``."""
    if value is None:
        return "None"
    module = type(value).__module__
    return type(value).__qualname__ if module == "builtins" else f"{module.split('.')[0]}.{type(value).__qualname__}"


def _describe(value: Any) -> str:
    """``None``, ``str 'abc'``, ``numpy.ndarray``: the type, and the value when it is short and readable."""
    if value is None:
        return "None"
    if isinstance(value, (str, numbers.Number)):
        return f"{_kind(value)} {_short(value)}"
    return _kind(value)


def _hint(fix: str) -> str:
    return f"; {fix}" if fix else ""


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, fix: str = "") -> int:
    """``value`` as an ``int``: integers (and integral floats such as 4.0) pass; bools, strings, None,
    arrays and fractions do not. Bounds are inclusive."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}{_hint(fix)}")
    if not math.isfinite(float(value)) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}{_hint(fix)}")
    value = int(value)
    _check_bounds(name, value, minimum, maximum, fix)
    return value


def check_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None, below: float | None = None, finite: bool = True, fix: str = "") -> float:
    """``value`` as a ``float``; NaN is always refused, infinities unless ``finite=False``. ``minimum``/``maximum``
    are inclusive bounds, ``above``/``below`` exclusive ones."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.requires_grad:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(value)}{_hint(fix)}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}{_hint(fix)}")
    _check_bounds(name, value, minimum, maximum, fix)
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above:g}, got {value!r}{_hint(fix)}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be < {below:g}, got {value!r}{_hint(fix)}")
    return value


def _check_bounds(name: str, value: float, minimum: float | None, maximum: float | None, fix: str) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must lie in [{minimum:g}, {maximum:g}], got {value!r}{_hint(fix)}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}{_hint(fix)}")
    if maximum is not None and not value <= maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value!r}{_hint(fix)}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (strings)."""
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_tensor(name: str, value: Any, ndim: int | tuple[int, ...] | None = None, finite: bool = False,
                 floating: bool = False, fix: str = "") -> torch.Tensor:
    """``value`` if it is a ``torch.Tensor`` (of ``ndim`` dimensions, floating, all finite, as asked).

    A NumPy array or a list gets a TypeError that says how to convert it."""
    if not isinstance(value, torch.Tensor):
        convert = ("convert it with torch.from_numpy(...)" if type(value).__module__.startswith("numpy")
                   else "pass a torch.Tensor")
        raise TypeError(f"{name} must be a torch.Tensor, got {_kind(value)}; {convert}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and value.ndim not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}{_hint(fix)}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}; convert it with .float()")
    if finite and not bool(torch.isfinite(value.detach()).all()):
        raise ValueError(f"{name} contains NaN or infinite values{_hint(fix or 'check how it was made')}")
    return value


def check_callable(name: str, value: Any, what: str) -> Any:
    """``value`` if it can be called; ``what`` describes what is expected (e.g. "an ε-model eps(x, t)")."""
    if not callable(value):
        raise TypeError(f"{name} must be {what}, got {_describe(value)}")
    return value


def check_shape(name: str, value: Any, fix: str = "") -> tuple[int, ...]:
    """A shape: a tuple/list/torch.Size of positive integers."""
    if not isinstance(value, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be a tuple of positive integers such as (1, 3, 64, 64), "
                        f"got {_describe(value)}{_hint(fix)}")
    return tuple(check_int(f"{name}[{i}]", v, minimum=1, fix=fix) for i, v in enumerate(value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
