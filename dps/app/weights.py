"""Safetensors loading with key and shape checks (never a pickle)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_checked(path: str | Path, expected: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Read ``path`` and verify it holds exactly the keys and shapes of ``expected``; raise ValueError otherwise."""
    from safetensors.torch import load_file

    path = require_safetensors(path)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        detail = "; ".join(f"{name}: {keys[:3]}{'...' if len(keys) > 3 else ''}" for name, keys in
                           (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys)
        raise ValueError(f"{path} is not a {what} file ({detail}); check that you passed the right file")
    return {k: v.to(expected[k].dtype) for k, v in state.items()}


def require_safetensors(path: str | Path) -> Path:
    """``path`` as a Path; ValueError unless it names a .safetensors file (pickles are never loaded)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files are loaded (pickled checkpoints are unsafe); "
                         "convert it with safetensors.torch.save_file")
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(require_safetensors(path)), framework="pt") as f:
        return dict(f.metadata() or {})
