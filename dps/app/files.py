"""Output files of the application: checked before any work starts, written atomically.

``check_output`` refuses, with the fix, an output path that is a folder, lies in a folder that does not exist
or cannot be written, has the wrong suffix, is one of the command's inputs, or lies inside the installed
package (whose bundled weights must never change). ``atomic_write`` writes a temporary file in the target's
folder and renames it over the target (``os.replace``), so an interrupted or failed run leaves either the old
file or the new one, never half a file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Mapping

PACKAGE = Path(__file__).resolve().parents[1]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def inside_package(path: str | Path) -> bool:
    """Whether ``path`` lies inside the installed ``dps`` package."""
    try:
        Path(path).resolve().relative_to(PACKAGE)
        return True
    except ValueError:
        return False


def check_output(path: str | Path, option: str, inputs: Mapping[str, str | Path | None] | None = None,
                 suffixes: tuple[str, ...] = (".png",), create_parent: bool = False) -> Path:
    """``path`` as a Path if a command may write it; ValueError naming ``option`` and the fix otherwise.

    ``inputs`` maps the options of the files the command reads (``{"--input": path}``) to their paths; the
    output may be none of them. ``create_parent``: a missing folder is fine if the command creates it (the
    nearest existing folder above it must be writable); otherwise it is refused.
    """
    path = Path(path)
    inputs = inputs or {}
    example = f"result{suffixes[0]}"
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name, e.g. {option} {path / example}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path} must end in {' or '.join(suffixes)} (that is the format written); "
                         f"e.g. {option} {path.with_suffix(suffixes[0])}")
    for flag, other in inputs.items():
        if other is not None and _same_file(path, Path(other)):
            raise ValueError(f"{option} {path} is the same file as {flag}; it would be overwritten. "
                             f"Choose another name, e.g. {option} {path.with_name(path.stem + '_restored' + path.suffix)}")
    if inside_package(path):
        raise ValueError(f"{option} {path} lies inside the installed DPS package ({PACKAGE}), whose bundled files "
                         f"must not change; choose a path outside it, e.g. {option} {example}")
    parent = path.parent
    if not parent.is_dir() and not create_parent:
        raise ValueError(f"{option} {path}: the folder {parent} does not exist; create it first "
                         f"(mkdir -p {parent}) or choose another folder")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {parent} is not writable; choose another folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path} exists and is read-only; choose another name")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a new temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` fails; its permissions follow the umask like any new file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
