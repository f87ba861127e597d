"""Story grids: ground-truth and generated frames of a story side by side, with captions (pure functions).

Layout of :func:`story_grid` (all sizes in pixels, ``pad`` between cells and around the grid)::

    +-------+------------------+------------------+-- ...
    | label | real frame 0     | real frame 1     |        <- row 0: ground truth (only when ``real`` is given)
    +-------+------------------+------------------+-- ...
    | label | generated 0      | generated 1      |        <- last row: generated frames
    +-------+------------------+------------------+-- ...
    |       | caption 0        | caption 1        |        <- wrapped captions, one per column
    +-------+------------------+------------------+-- ...

* width  = ``label_width + pad + n_cols * (cell + pad)``, where ``label_width`` is 0 with ``row_labels=None``;
* height = ``pad + n_rows * (cell + pad) + caption_height``, where ``caption_height`` is
  ``n_lines * line_height + pad`` (``n_lines`` = most wrapped lines of any column, 0 if nothing is written);
* cell ``(row, col)`` has its top-left corner at ``(y, x) = (pad + row * (cell + pad),
  label_width + pad + col * (cell + pad))``; frames are upscaled with nearest-neighbour to fit
  ``cell × cell`` (aspect kept, centred).

Story continuation: ``source_frame`` becomes an extra first column. In the generated row it is framed by a
``SOURCE_COLOR`` border (drawn in the padding around the cell, so the frame's pixels are untouched) and its
caption starts with ``[source]`` in that colour; in the ground-truth row it is shown unmarked, since it is the
real first frame of the story.

No Lightning here; the logging callback calls these functions. Text uses Pillow's built-in default font
(nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from storyexp.utils.io import atomic_write

__all__ = ["story_grid", "stack_grids", "save_png", "SOURCE_COLOR", "BACKGROUND", "TEXT_COLOR", "SEPARATOR_COLOR"]

SOURCE_COLOR = (255, 140, 0)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
SEPARATOR_COLOR = (200, 200, 200)
SOURCE_TAG = "[source]"


def _frames(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 [V, H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    return arr


def _image(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 [H, W, 3], got {arr.dtype} {tuple(arr.shape)}")
    return arr


def _font(cell: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font. At its default 10 px the spaces render 2 px wide and words run together, so
    # cells wide enough for it get 12 px.
    try:
        return ImageFont.load_default(size=12 if cell >= 64 else 10)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _safe_text(text: str, font: Any) -> str:
    # The bitmap fallback font (Pillow without FreeType) can only encode latin-1.
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _line_height(font: Any) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return ascent + descent + 1
    return font.getbbox("Ag")[3] + 2


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words are split; at most ``max_lines`` lines."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if font.getlength(candidate) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = ""
            while font.getlength(word) > width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and font.getlength(word[:cut]) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            current = word
        if current:
            lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _fit(frame: np.ndarray, cell: int) -> np.ndarray:
    """Nearest-neighbour resize so the frame fits ``cell × cell`` (aspect kept), centred on the background."""
    h, w = frame.shape[:2]
    scale = cell / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = frame if (nh, nw) == (h, w) else np.asarray(Image.fromarray(frame).resize((nw, nh), Image.NEAREST))
    out = np.empty((cell, cell, 3), np.uint8)
    out[:] = BACKGROUND
    y0, x0 = (cell - nh) // 2, (cell - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = img
    return out


def story_grid(
    real: Any | None,
    generated: Any,
    captions: Sequence[str],
    *,
    cell: int = 128,
    source_frame: Any | None = None,
    pad: int = 4,
    row_labels: Sequence[str] | None = ("ground truth", "generated"),
    max_caption_lines: int = 8,
) -> np.ndarray:
    """One story as a uint8 ``[Hg, Wg, 3]`` image: ground-truth row above generated row, captions below.

    Args:
        real: uint8 ``[V, H, W, 3]`` ground-truth frames aligned with ``generated``, or ``None`` (one row).
        generated: uint8 ``[V, H', W', 3]`` generated frames (sizes may differ from ``real``).
        captions: one caption per column: ``V`` strings, or ``V + 1`` with ``source_frame`` (the first one
            is then the source frame's caption).
        cell: side of the square cell every frame is upscaled into (nearest neighbour).
        source_frame: uint8 ``[H, W, 3]`` given first frame of a continuation story; shown as a marked first
            column (see module docstring).
        pad: padding in pixels between cells and around the grid (also the width of the source border); >= 2.
        row_labels: names of the (ground-truth, generated) rows written left of them; ``None`` for no label
            column. With ``real=None`` only the second name is used.
        max_caption_lines: longer captions are cut and end with ``...``.

    The geometry is given in the module docstring.
    """
    gen = _frames(generated, "generated")
    n_gen = gen.shape[0]
    if n_gen == 0:
        raise ValueError("generated: a story grid needs at least one frame")
    ref = None if real is None else _frames(real, "real")
    if ref is not None and ref.shape[0] != n_gen:
        raise ValueError(f"real has {ref.shape[0]} frames but generated has {n_gen}")
    src = None if source_frame is None else _image(source_frame, "source_frame")
    if cell < 1 or pad < 2:
        raise ValueError(f"need cell >= 1 and pad >= 2, got cell={cell}, pad={pad}")
    n_cols = n_gen + (src is not None)
    captions = [str(c) for c in captions]
    if src is not None and len(captions) == n_gen:
        captions = [""] + captions
    if len(captions) != n_cols:
        raise ValueError(
            f"got {len(captions)} captions for {n_gen} generated frames"
            + (" plus a source frame (give V or V + 1 captions)" if src is not None else " (give one per frame)")
        )

    font = _font(cell)
    line_h = _line_height(font)
    names: list[str] = []
    if row_labels is not None:
        if len(row_labels) != 2:
            raise ValueError(f"row_labels must be two names (ground truth, generated), got {row_labels!r}")
        names = [str(row_labels[0]), str(row_labels[1])] if ref is not None else [str(row_labels[1])]
        names = [_safe_text(n, font) for n in names]
    label_w = (int(np.ceil(max(font.getlength(n) for n in names))) + pad) if names else 0

    wrapped = [_wrap(_safe_text(c, font), font, cell, max_caption_lines) for c in captions]
    if src is not None:
        wrapped[0] = [SOURCE_TAG] + wrapped[0][: max_caption_lines - 1]
    n_lines = max(len(w) for w in wrapped)
    caption_h = n_lines * line_h + pad if n_lines else 0

    n_rows = 1 + (ref is not None)
    height = pad + n_rows * (cell + pad) + caption_h
    width = label_w + pad + n_cols * (cell + pad)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND

    def origin(row: int, col: int) -> tuple[int, int]:
        return pad + row * (cell + pad), label_w + pad + col * (cell + pad)

    rows: list[list[np.ndarray]] = []
    if ref is not None:
        rows.append(([src] if src is not None else []) + list(ref))
    rows.append(([src] if src is not None else []) + list(gen))
    for r, frames in enumerate(rows):
        for c, frame in enumerate(frames):
            y, x = origin(r, c)
            canvas[y : y + cell, x : x + cell] = _fit(frame, cell)
    if src is not None:  # border in the padding ring around the generated row's source cell
        y, x = origin(n_rows - 1, 0)
        canvas[y - pad : y + cell + pad, x - pad : x + cell + pad][:pad] = SOURCE_COLOR
        canvas[y - pad : y + cell + pad, x - pad : x + cell + pad][-pad:] = SOURCE_COLOR
        canvas[y - pad : y + cell + pad, x - pad : x] = SOURCE_COLOR
        canvas[y - pad : y + cell + pad, x + cell : x + cell + pad] = SOURCE_COLOR

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for r, name in enumerate(names):
        y, _ = origin(r, 0)
        draw.text((pad // 2, y + cell // 2 - line_h // 2), name, font=font, fill=TEXT_COLOR)
    caption_top = pad + n_rows * (cell + pad)
    for c, lines in enumerate(wrapped):
        _, x = origin(0, c)
        for i, line in enumerate(lines):
            colour = SOURCE_COLOR if (src is not None and c == 0 and i == 0) else TEXT_COLOR
            draw.text((x, caption_top + i * line_h), line, font=font, fill=colour)
    return np.asarray(image, dtype=np.uint8).copy()


def stack_grids(grids: Sequence[Any], *, pad: int = 8) -> np.ndarray:
    """Stack several story grids vertically (left-aligned, narrower ones padded right).

    Consecutive grids are ``pad`` pixels apart, with a 1-pixel ``SEPARATOR_COLOR`` line in the middle of the gap.
    """
    arrays = [_image(g, f"grids[{i}]") for i, g in enumerate(grids)]
    if not arrays:
        raise ValueError("stack_grids: no grids given")
    height = sum(a.shape[0] for a in arrays) + pad * (len(arrays) - 1)
    width = max(a.shape[1] for a in arrays)
    out = np.empty((height, width, 3), np.uint8)
    out[:] = BACKGROUND
    y = 0
    for i, a in enumerate(arrays):
        out[y : y + a.shape[0], : a.shape[1]] = a
        y += a.shape[0] + pad
        if i + 1 < len(arrays) and pad >= 3:
            out[y - pad + pad // 2] = SEPARATOR_COLOR
    return out


def save_png(array: Any, path: str | os.PathLike) -> Path:
    """Write a uint8 ``[H, W, 3]`` image as PNG atomically (temporary file in the same folder, then rename)."""
    img = Image.fromarray(_image(array, "image"))
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
