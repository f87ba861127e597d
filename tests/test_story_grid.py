"""Tests for storyexp.callbacks.story_grid (pure image functions)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from storyexp.callbacks.story_grid import (
    BACKGROUND,
    SEPARATOR_COLOR,
    SOURCE_COLOR,
    save_png,
    stack_grids,
    story_grid,
)

PALETTE = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
           (120, 60, 10), (10, 60, 120), (90, 90, 90), (250, 120, 160)]  # fmt: skip


def solid(colours, size=16) -> np.ndarray:
    """One frame per colour, each filled with that colour: uint8 [V, size, size, 3]."""
    return np.stack([np.full((size, size, 3), c, np.uint8) for c in colours])


def cell_origin(row: int, col: int, *, cell: int, pad: int = 4, label_width: int = 0) -> tuple[int, int]:
    return pad + row * (cell + pad), label_width + pad + col * (cell + pad)


def cell_pixels(grid, row, col, *, cell, pad=4, label_width=0) -> np.ndarray:
    y, x = cell_origin(row, col, cell=cell, pad=pad, label_width=label_width)
    return grid[y : y + cell, x : x + cell]


def is_uniform(block: np.ndarray, colour) -> bool:
    return bool((block == np.array(colour, np.uint8)).all())


def test_shape_arithmetic_without_text():
    real, gen = solid(PALETTE[:5]), solid(PALETTE[5:])
    g = story_grid(real, gen, [""] * 5, cell=32, row_labels=None)
    # No caption text and no labels: width = pad + 5 * (cell + pad), height = pad + 2 * (cell + pad).
    assert g.dtype == np.uint8 and g.shape == (4 + 2 * 36, 4 + 5 * 36, 3)
    g1 = story_grid(None, gen, [""] * 5, cell=32, row_labels=None, pad=6)
    assert g1.shape == (6 + 38, 6 + 5 * 38, 3)


def test_shape_arithmetic_with_captions_and_labels():
    real, gen = solid(PALETTE[:4]), solid(PALETTE[4:8])
    one_line = story_grid(real, gen, ["a", "b", "c", "d"], cell=40, row_labels=None)
    two_lines = story_grid(real, gen, ["a", "b\nb2", "c", "d"], cell=40, row_labels=None)
    assert one_line.shape[1] == two_lines.shape[1] == 4 + 4 * 44
    line_h = two_lines.shape[0] - one_line.shape[0]
    assert line_h > 5  # one more text line
    assert one_line.shape[0] == 4 + 2 * 44 + line_h + 4  # one caption line + bottom pad
    labelled = story_grid(real, gen, ["a", "b", "c", "d"], cell=40)
    assert labelled.shape[0] == one_line.shape[0] and labelled.shape[1] > one_line.shape[1]


def test_ground_truth_row_above_generated_row():
    real, gen = solid(PALETTE[:5]), solid(PALETTE[5:])
    cell = 32
    g = story_grid(real, gen, [f"caption {i}" for i in range(5)], cell=cell, row_labels=None)
    for i in range(5):
        assert is_uniform(cell_pixels(g, 0, i, cell=cell), PALETTE[i])
        assert is_uniform(cell_pixels(g, 1, i, cell=cell), PALETTE[5 + i])
    # Padding between cells stays background.
    y, x = cell_origin(0, 1, cell=cell)
    assert is_uniform(g[y : y + cell, x - 4 : x], BACKGROUND)


def test_upscaling_is_nearest_and_keeps_aspect():
    frame = np.zeros((1, 4, 8, 3), np.uint8)
    frame[0, :, :4] = PALETTE[0]
    frame[0, :, 4:] = PALETTE[1]
    cell = 32
    g = story_grid(None, frame, ["x"], cell=cell, row_labels=None)
    block = cell_pixels(g, 0, 0, cell=cell)
    # 4x8 -> 16x32, centred vertically: rows 8..23 hold the frame, the rest is background.
    assert is_uniform(block[:8], BACKGROUND) and is_uniform(block[24:], BACKGROUND)
    assert is_uniform(block[8:24, :16], PALETTE[0]) and is_uniform(block[8:24, 16:], PALETTE[1])


def test_real_and_generated_may_have_different_sizes():
    g = story_grid(solid(PALETTE[:2], size=8), solid(PALETTE[2:4], size=20), ["a", "b"], cell=40, row_labels=None)
    assert is_uniform(cell_pixels(g, 0, 1, cell=40), PALETTE[1])
    assert is_uniform(cell_pixels(g, 1, 0, cell=40), PALETTE[2])


def test_captions_write_under_their_column():
    real, gen = solid(PALETTE[:3]), solid(PALETTE[3:6])
    cell = 48
    blank = story_grid(real, gen, ["", "", ""], cell=cell, row_labels=None)
    texted = story_grid(real, gen, ["", "Pororo waves hello to Crong", ""], cell=cell, row_labels=None)
    top = 4 + 2 * (cell + 4)  # the caption area starts below the generated row
    assert texted.shape[0] > blank.shape[0]
    np.testing.assert_array_equal(texted[:top], blank[:top])  # frames untouched
    area = texted[top:]
    dark = (area.astype(int).sum(-1) < 300).any(axis=0)  # columns of the image holding text pixels
    x0, x1 = cell_origin(0, 1, cell=cell)[1], cell_origin(0, 2, cell=cell)[1]
    assert dark[x0 : x1 - 4].any()
    assert not dark[:x0].any() and not dark[x1:].any()
    # A long caption is wrapped within the cell width, onto several lines.
    long = story_grid(real, gen, ["", "word " * 30, ""], cell=cell, row_labels=None)
    assert long.shape[0] > texted.shape[0]
    dark = (long[top:].astype(int).sum(-1) < 300).any(axis=0)
    assert not dark[:x0].any() and not dark[x1:].any()


def test_row_labels_are_written_left_of_the_rows():
    real, gen = solid(PALETTE[:2]), solid(PALETTE[2:4])
    g = story_grid(real, gen, ["a", "b"], cell=32)
    unlabelled = story_grid(real, gen, ["a", "b"], cell=32, row_labels=None)
    label_w = g.shape[1] - unlabelled.shape[1]
    assert label_w > 0
    strip = g[: 4 + 2 * 36, :label_w]
    assert (strip.astype(int).sum(-1) < 300).any()
    assert is_uniform(cell_pixels(g, 1, 1, cell=32, label_width=label_w), PALETTE[3])


def test_source_frame_is_first_column_and_marked():
    real, gen = solid(PALETTE[1:5]), solid(PALETTE[5:9])
    source = np.full((16, 16, 3), PALETTE[0], np.uint8)
    cell, pad = 32, 4
    g = story_grid(real, gen, ["src caption"] + [f"c{i}" for i in range(4)], cell=cell, source_frame=source,
                   row_labels=None)  # fmt: skip
    assert g.shape[1] == pad + 5 * (cell + pad)
    # Generated row: the source, then the generated frames; ground-truth row: the source, then the real frames.
    assert is_uniform(cell_pixels(g, 1, 0, cell=cell), PALETTE[0])
    assert is_uniform(cell_pixels(g, 0, 0, cell=cell), PALETTE[0])
    for i in range(4):
        assert is_uniform(cell_pixels(g, 0, i + 1, cell=cell), PALETTE[1 + i])
        assert is_uniform(cell_pixels(g, 1, i + 1, cell=cell), PALETTE[5 + i])
    # A SOURCE_COLOR border fills the padding ring around the generated source cell only.
    y, x = cell_origin(1, 0, cell=cell)
    ring = g[y - pad : y + cell + pad, x - pad : x + cell + pad].copy()
    ring[pad:-pad, pad:-pad] = SOURCE_COLOR
    assert is_uniform(ring, SOURCE_COLOR)
    y0, x0 = cell_origin(0, 0, cell=cell)
    assert is_uniform(g[y0 - pad : y0, x0 : x0 + cell], BACKGROUND)  # ground-truth source cell not marked
    y1, x1 = cell_origin(1, 1, cell=cell)
    assert is_uniform(g[y1 + cell : y1 + cell + pad, x1 + 2 : x1 + cell], BACKGROUND)
    # The "[source]" tag is written in SOURCE_COLOR in the first caption.
    top = pad + 2 * (cell + pad)
    orange = (np.abs(g[top:].astype(int) - np.array(SOURCE_COLOR)).sum(-1) < 60).any(axis=0)
    assert orange[x : x + cell].any() and not orange[x + cell + pad :].any()

    # V captions with a source frame: the source column gets the tag only.
    g2 = story_grid(None, gen, [f"c{i}" for i in range(4)], cell=cell, source_frame=source, row_labels=None)
    assert g2.shape[1] == g.shape[1]
    assert is_uniform(cell_pixels(g2, 0, 0, cell=cell), PALETTE[0])


def test_input_errors():
    gen = solid(PALETTE[:3])
    with pytest.raises(ValueError, match="captions"):
        story_grid(None, gen, ["a", "b"])
    with pytest.raises(ValueError, match="real has 2 frames"):
        story_grid(gen[:2], gen, ["a", "b", "c"])
    with pytest.raises(ValueError, match="uint8"):
        story_grid(None, gen.astype(np.float32), ["a", "b", "c"])
    with pytest.raises(ValueError, match="source_frame"):
        story_grid(None, gen, ["a", "b", "c"], source_frame=gen)
    with pytest.raises(ValueError, match="at least one"):
        story_grid(None, gen[:0], [])


def test_stack_grids_and_save_png(tmp_path):
    a = story_grid(solid(PALETTE[:3]), solid(PALETTE[3:6]), ["a", "b", "c"], cell=24)
    b = story_grid(None, solid(PALETTE[:2]), ["a", "b"], cell=24)
    s = stack_grids([a, b], pad=8)
    assert s.shape == (a.shape[0] + 8 + b.shape[0], max(a.shape[1], b.shape[1]), 3)
    np.testing.assert_array_equal(s[: a.shape[0], : a.shape[1]], a)
    np.testing.assert_array_equal(s[a.shape[0] + 8 :, : b.shape[1]], b)
    assert is_uniform(s[a.shape[0] + 8 :, b.shape[1] :], BACKGROUND)  # narrower grid padded right
    assert is_uniform(s[a.shape[0] + 4], SEPARATOR_COLOR)
    with pytest.raises(ValueError):
        stack_grids([])

    path = save_png(s, tmp_path / "out" / "grid.png")
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), s)
    save_png(a, path)  # replaces atomically
    assert np.asarray(Image.open(path)).shape == a.shape
