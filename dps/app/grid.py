"""A labelled image grid: column groups (one per task, its name on top), rows with their label on the left, and
a caption under each row of each group (e.g. its PSNR). Pure torch; text in the 5x7 font of ``dps.app.font``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import font

WHITE, INK = 1.0, -1.0


@dataclass
class Cell:
    """One row of one group: ``images`` (N, C, H, W) in [-1, 1], the first few of which are shown, and a caption."""
    images: torch.Tensor
    caption: str = ""


def labelled_grid(groups: dict[str, list[Cell]], row_labels: list[str], per_group: int = 3, title: str = "",
                  min_tile: int = 84, text_scale: int = 2, gap: int = 4, margin: int = 10) -> torch.Tensor:
    """(C, H, W) image in [-1, 1] on white: ``groups`` maps a group name to one Cell per entry of ``row_labels``.

    Tiles are enlarged by an integer factor (nearest) to at least ``min_tile`` pixels high."""
    if not groups:
        raise ValueError("nothing to draw")
    if any(len(cells) != len(row_labels) for cells in groups.values()):
        raise ValueError(f"every group needs one cell per row label ({len(row_labels)})")
    first = next(iter(groups.values()))[0].images
    c, h, w = first.shape[1:]
    zoom = max(1, -(-min_tile // h))
    th, tw = h * zoom, w * zoom
    line = font.HEIGHT * text_scale
    shown = min(per_group, min(len(cell.images) for cells in groups.values() for cell in cells))

    tiles_w = shown * tw + (shown - 1) * gap
    widths = {name: max([tiles_w, font.text_width(name, text_scale)]
                        + [font.text_width(cell.caption, text_scale) for cell in cells]) for name, cells in groups.items()}
    label_w = max(font.text_width(label, text_scale) for label in row_labels)
    title_h = line + 4 * gap if title else 0
    row_h = th + gap + line + 3 * gap
    width = margin + label_w + 3 * gap + sum(widths.values()) + 3 * gap * (len(groups) - 1) + margin
    height = margin + title_h + line + 2 * gap + len(row_labels) * row_h + margin
    width = max(width, margin + font.text_width(title, text_scale) + margin)

    canvas = torch.full((c, height, width), WHITE)
    if title:
        font.draw(canvas, title, margin, margin, text_scale, INK)
    top = margin + title_h + line + 2 * gap
    for r, label in enumerate(row_labels):
        font.draw(canvas, label, margin, top + r * row_h + (th - line) // 2, text_scale, INK)
    x = margin + label_w + 3 * gap
    for name, cells in groups.items():
        font.draw(canvas, name, x, margin + title_h, text_scale, INK)
        for r, cell in enumerate(cells):
            y = top + r * row_h
            for i in range(shown):
                tile = cell.images[i].clamp(-1, 1).repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
                tile = tile.expand(c, -1, -1) if tile.shape[0] != c else tile
                canvas[:, y:y + th, x + i * (tw + gap):x + i * (tw + gap) + tw] = tile
            if cell.caption:
                font.draw(canvas, cell.caption, x, y + th + gap, text_scale, INK)
        x += widths[name] + 3 * gap
    return canvas
