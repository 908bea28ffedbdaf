"""PNG reading and writing without extra dependencies (Pillow is used when it is installed, for other
formats such as JPEG). Images come back as float tensors (C, H, W) in [-1, 1].

Reading checks the size an image declares (a PNG's IHDR, Pillow's header) before decoding it, so a small file
that claims 20000x20000 pixels is refused without allocating them. Every PNG the standard allows is read, with
or without Pillow: bit depths 1-16, greyscale, RGB, palette, with alpha (dropped), Adam7-interlaced.
Writing refuses NaN or infinite values (they would become black pixels) and is atomic.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..validate import check_tensor
from .files import atomic_write_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 4096 * 4096
# Adam7 passes: (x0, y0, dx, dy) (PNG specification, section 8.2).
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}            # colour type -> samples per pixel
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


class ImageReadError(ValueError):
    pass


def write_png(path: str | Path, image: torch.Tensor) -> None:
    """Write (C, H, W) in [-1, 1] (C = 1 or 3) as an 8-bit PNG, atomically (temporary file, then rename).

    ValueError, and nothing written, if the image holds NaN or infinite values."""
    check_tensor("image", image, ndim=3, fix="pass one image of shape (C, H, W), e.g. batch[0]")
    c, h, w = image.shape
    if c not in (1, 3):
        raise ValueError(f"can only write 1- or 3-channel images, got {c}")
    if not bool(torch.isfinite(image.detach()).all()):
        raise ValueError(f"the image to write to {path} contains NaN or infinite values (the run diverged); "
                         "nothing was written. Lower zeta or use more steps")
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    rows = arr.permute(1, 2, 0).numpy().reshape(h, w * c)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    atomic_write_bytes(path, PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                       + chunk(b"IEND", b""))


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    depth: int
    color: int
    interlace: int


def png_header(data: bytes) -> PngHeader:
    """The IHDR of PNG bytes (the first 33 bytes suffice); ImageReadError if it is missing or invalid."""
    if data[:8] != PNG_SIGNATURE:
        raise ImageReadError("not a PNG file")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageReadError("PNG without a header (truncated file?)")
    w, h, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if color not in DEPTHS or depth not in DEPTHS[color] or compression or filtering or interlace > 1:
        raise ImageReadError(f"invalid PNG header (bit depth {depth}, colour type {color}, interlace {interlace})")
    if w == 0 or h == 0:
        raise ImageReadError(f"the PNG declares an empty image ({w}x{h})")
    return PngHeader(w, h, depth, color, interlace)


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageReadError(f"the image declares {w}x{h} pixels ({w * h / 1e6:.0f} MP), more than the "
                             f"{max_pixels / 1e6:.0f} MP this reads; resize it first")


def _chunks(data: bytes) -> tuple[bytes, bytes | None]:
    """(concatenated IDAT data, PLTE body or None)."""
    pos, idat, palette = 8, [], None
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if len(body) < length:
            raise ImageReadError(f"truncated PNG (chunk {kind!r} is cut off)")
        pos += 12 + length
        if kind == b"IDAT":
            idat.append(body)
        elif kind == b"PLTE":
            palette = body
        elif kind == b"IEND":
            break
    if not idat:
        raise ImageReadError("PNG without image data")
    return b"".join(idat), palette


def _passes(hd: PngHeader) -> list[tuple[int, int, int, int, int, int]]:
    """(x0, y0, dx, dy, width, height) of each non-empty pass: one for a plain PNG, up to seven for Adam7."""
    if not hd.interlace:
        return [(0, 0, 1, 1, hd.width, hd.height)]
    out = []
    for x0, y0, dx, dy in ADAM7:
        pw, ph = (hd.width - x0 + dx - 1) // dx, (hd.height - y0 + dy - 1) // dy
        if pw > 0 and ph > 0:
            out.append((x0, y0, dx, dy, pw, ph))
    return out


def _unfilter(raw: memoryview, width: int, height: int, hd: PngHeader) -> np.ndarray:
    """Undo the per-row filters (PNG specification, section 9) of one pass: (height, stride) uint8."""
    bits = CHANNELS[hd.color] * hd.depth
    bpp, stride = max(1, bits // 8), (width * bits + 7) // 8
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for x in range(bpp, stride):
                line[x] = (line[x] + line[x - bpp]) & 255
        elif kind == 2:
            line = bytearray((np.frombuffer(line, np.uint8) + np.frombuffer(prev, np.uint8)).tobytes())
        elif kind == 3:
            for x in range(stride):
                left = line[x - bpp] if x >= bpp else 0
                line[x] = (line[x] + ((left + prev[x]) >> 1)) & 255
        elif kind == 4:
            for x in range(stride):
                a = line[x - bpp] if x >= bpp else 0
                b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        elif kind != 0:
            raise ImageReadError(f"corrupt PNG (unknown row filter {kind})")
        out[y] = np.frombuffer(line, np.uint8)
        prev = line
    return out


def _samples(rows: np.ndarray, width: int, hd: PngHeader) -> np.ndarray:
    """Filtered-back bytes -> (height, width, channels) samples (uint8 or uint16)."""
    channels = CHANNELS[hd.color]
    if hd.depth == 16:
        values = rows.view(">u2").astype(np.uint16)
    elif hd.depth == 8:
        values = rows
    else:
        per_byte = 8 // hd.depth
        shifts = np.arange(8 - hd.depth, -1, -hd.depth, dtype=np.uint8)
        values = (rows[:, :, None] >> shifts) & ((1 << hd.depth) - 1)
        values = values.reshape(rows.shape[0], rows.shape[1] * per_byte)
    return values[:, :width * channels].reshape(rows.shape[0], width, channels)


def decode_png(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any standard PNG to float64 (H, W, C) in [0, 1], C = 1 or 3 (alpha dropped, palette expanded)."""
    hd = png_header(data)
    _check_size(hd.width, hd.height, max_pixels)
    compressed, palette = _chunks(data)
    bits = CHANNELS[hd.color] * hd.depth
    passes = _passes(hd)
    expected = sum(ph * (1 + (pw * bits + 7) // 8) for *_, pw, ph in passes)
    try:
        raw = zlib.decompressobj().decompress(compressed, expected + 1)
    except zlib.error as exc:
        raise ImageReadError(f"corrupt PNG image data ({exc})") from exc
    if len(raw) != expected:
        raise ImageReadError(f"corrupt or truncated PNG: {len(raw)} bytes of image data, expected {expected}")
    channels = CHANNELS[hd.color]
    image = np.zeros((hd.height, hd.width, channels), dtype=np.uint16 if hd.depth == 16 else np.uint8)
    view, offset = memoryview(raw), 0
    for x0, y0, dx, dy, pw, ph in passes:
        size = ph * (1 + (pw * bits + 7) // 8)
        image[y0::dy, x0::dx] = _samples(_unfilter(view[offset:offset + size], pw, ph, hd), pw, hd)
        offset += size
    if hd.color == 3:
        if palette is None or len(palette) % 3:
            raise ImageReadError("palette PNG without a valid palette (PLTE chunk)")
        table = np.frombuffer(palette, np.uint8).reshape(-1, 3)
        if int(image.max()) >= len(table):
            raise ImageReadError(f"corrupt palette PNG: index {int(image.max())} beyond its {len(table)} colours")
        return table[image[..., 0]].astype(np.float64) / 255
    if channels in (2, 4):
        image = image[..., :-1]
    return image.astype(np.float64) / float((1 << hd.depth) - 1)


def _read_with_pillow(Image, path: Path, header: PngHeader | None, max_pixels: int) -> np.ndarray:
    """Float64 (H, W, C) in [0, 1] through Pillow; 16-bit greyscale keeps its 16 bits."""
    with Image.open(path) as im:
        _check_size(*im.size, max_pixels)
        mode = im.mode
        if mode.startswith("I;16") or (mode == "I" and header is not None and header.depth == 16):
            return np.asarray(im, dtype=np.float64)[..., None] / 65535
        if mode in ("I", "F"):
            raise ImageReadError(f"{'32-bit integer' if mode == 'I' else 'floating-point'} images are not "
                                 "supported; save it as an 8- or 16-bit PNG")
        # As without Pillow: greyscale PNGs (with alpha too, which Pillow opens as RGBA at 16 bits) give one
        # channel, palettes three.
        grey = header.color in (0, 4) if header is not None else mode in ("1", "L", "LA", "La")
        return np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float64).reshape(
            im.size[1], im.size[0], -1) / 255


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read an image file as (C, H, W) in [-1, 1]; alpha is dropped, C is 1 or 3.

    ImageReadError (a ValueError) naming the fix for a missing file, a folder, an unreadable or corrupt
    image, or one that declares more than ``max_pixels`` pixels (checked before decoding)."""
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file; pass the image's file name")
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    try:
        from PIL import Image
    except ImportError:
        Image = None
    try:
        with open(path, "rb") as f:
            head = f.read(33)
        header = png_header(head) if head[:8] == PNG_SIGNATURE else None
        if header is not None:
            _check_size(header.width, header.height, max_pixels)
        if Image is not None:
            arr = _read_with_pillow(Image, path, header, max_pixels)
        elif header is None:
            raise ImageReadError("not a PNG file, and other formats need Pillow (pip install pillow)")
        else:
            arr = decode_png(path.read_bytes(), max_pixels)
    except ImageReadError as exc:
        raise ImageReadError(f"cannot read {path}: {exc}") from exc
    except OSError as exc:
        raise ImageReadError(f"cannot read {path} ({exc.strerror or exc})") from exc
    except Exception as exc:
        raise ImageReadError(f"cannot read {path} as an image ({exc})") from exc
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).mul(2).sub(1).float()
