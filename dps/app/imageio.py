"""PNG reading and writing without extra dependencies (Pillow is used when it is installed, for other
formats such as JPEG). Images come back as float tensors (C, H, W) in [-1, 1]."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch


class ImageReadError(ValueError):
    pass


def write_png(path: str | Path, image: torch.Tensor) -> None:
    """Write (C, H, W) in [-1, 1] (C = 1 or 3) as an 8-bit PNG."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    c, h, w = arr.shape
    if c not in (1, 3):
        raise ValueError(f"can only write 1- or 3-channel images, got {c}")
    rows = arr.permute(1, 2, 0).numpy().reshape(h, w * c)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a.astype(np.int16) + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c)).astype(np.uint8)


def _decode_png(data: bytes) -> np.ndarray:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ImageReadError("not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ImageReadError("PNG without a header")
    w, h, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ImageReadError("only 8-bit non-interlaced grayscale/RGB(A) PNGs are supported without Pillow; "
                             "install Pillow or re-save the image")
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    stride = w * channels
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        kind, line = raw[y * (stride + 1)], raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)].copy()
        if kind == 2:
            line = line + prev
        elif kind in (1, 3, 4):
            for x in range(stride):
                left = line[x - channels] if x >= channels else 0
                up_left = prev[x - channels] if x >= channels else 0
                if kind == 1:
                    line[x] = (int(line[x]) + int(left)) & 255
                elif kind == 3:
                    line[x] = (int(line[x]) + (int(left) + int(prev[x])) // 2) & 255
                else:
                    line[x] = (int(line[x]) + int(_paeth(np.uint8(left), prev[x], np.uint8(up_left)))) & 255
        out[y] = line
        prev = line
    return out.reshape(h, w, channels)


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as (C, H, W) in [-1, 1]; alpha is dropped, C is 1 or 3."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    try:
        from PIL import Image
    except ImportError:
        Image = None
    try:
        if Image is not None:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L" if im.mode in ("L", "LA", "I", "1") else "RGB"))
        else:
            arr = _decode_png(path.read_bytes())
    except ImageReadError as exc:
        raise ImageReadError(f"cannot read {path}: {exc}" + ("" if Image else " (install Pillow to read other "
                                                                        "formats than PNG)")) from exc
    except Exception as exc:
        raise ImageReadError(f"cannot read {path} as an image ({exc})") from exc
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] in (2, 4):
        arr = arr[..., :-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 127.5 - 1
