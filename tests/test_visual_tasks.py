"""The procedural visual tasks: deterministic, correct by construction, disjoint splits."""

import re

import numpy as np
import pytest

from hybridkv.data import (
    COLOURS,
    NEEDLE_SHAPE,
    SHAPES,
    SPLITS,
    TASKS,
    Sample,
    TaskConfig,
    make_sample,
    make_split,
    split_seeds,
    vocabulary,
)
from hybridkv.data.visual_tasks import cell_background


def _derive_answer(sample: Sample) -> str:
    """Answer the question from the scene descriptions alone, independently of the generator."""
    q = sample.question
    if match := re.fullmatch(r"what (colour is the shape|shape is) in row (\d+) column ([a-z]) \?", q):
        (scene,) = sample.scenes
        row, col = int(match.group(2)) - 1, ord(match.group(3)) - ord("a")
        (item,) = [it for it in scene.items if (it.row, it.col) == (row, col)]
        return item.colour if match.group(1).startswith("colour") else item.shape
    if match := re.fullmatch(r"how many (\w+) shapes are there \?", q):
        (scene,) = sample.scenes
        return str(sum(it.colour == match.group(1) for it in scene.items))
    if match := re.fullmatch(r"what colour is the (\w+) \?", q):
        (needle,) = [it for scene in sample.scenes for it in scene.items if it.shape == match.group(1)]
        return needle.colour
    raise AssertionError(f"unexpected question {q!r}")


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed(task: str) -> None:
    a, b = make_sample(task, 1234), make_sample(task, 1234)
    assert a == b
    for x, y in zip(a.images(), b.images()):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    others = [make_sample(task, seed) for seed in range(1235, 1245)]
    assert any(o.scenes != a.scenes for o in others)


@pytest.mark.parametrize("task", TASKS)
def test_answers_correct_by_construction(task: str) -> None:
    for sample in make_split("validation", task, 40):
        assert sample.answer == _derive_answer(sample)
        assert all(w in vocabulary() for w in sample.question.split() + [sample.answer])


@pytest.mark.parametrize("task", ["cell_colour", "cell_shape", "needle"])
def test_target_cell_renders_the_answer(task: str) -> None:
    """The pixel at the target shape's centre has its colour; the colour is nearest its named nominal colour."""
    for sample in make_split("test", task, 20, num_images=4 if task == "needle" else None):
        image_index, row, col = sample.target
        scene = sample.scenes[image_index]
        item = scene.item_at(row, col)
        assert item is not None and sample.answer in (item.colour, item.shape)
        cell = scene.image_size / scene.grid
        x, y = int((col + 0.5 + item.dx) * cell), int((row + 0.5 + item.dy) * cell)
        pixel = tuple(int(v) for v in np.asarray(sample.images()[image_index])[y, x])
        assert pixel == item.rgb
        nearest = min(COLOURS, key=lambda c: sum((p - q) ** 2 for p, q in zip(pixel, COLOURS[c])))
        assert nearest == item.colour


def test_empty_cells_are_background() -> None:
    sample = make_sample("cell_colour", 7)
    (scene,) = sample.scenes
    pixels = np.asarray(sample.images()[0])
    empty = [(r, c) for r in range(scene.grid) for c in range(scene.grid) if scene.item_at(r, c) is None]
    assert empty
    for r, c in empty:
        left, top, right, bottom = scene.cell_box(r, c)
        assert tuple(pixels[(top + bottom) // 2, (left + right) // 2]) == cell_background(r, c, scene.grid)


def test_needle_is_unique_and_sizes_respect_config() -> None:
    config = TaskConfig(min_images=4, max_images=16)
    sizes = set()
    for sample in make_split("train", "needle", 30, config):
        stars = [(i, it.row, it.col) for i, s in enumerate(sample.scenes) for it in s.items if it.shape == NEEDLE_SHAPE]
        assert stars == [sample.target]
        assert all(it.shape in SHAPES for s in sample.scenes for it in s.items if it.shape != NEEDLE_SHAPE)
        sizes.add(len(sample.scenes))
        assert all(config.min_items <= len(s.items) <= config.max_items for s in sample.scenes)
    assert min(sizes) >= 4 and max(sizes) <= 16 and len(sizes) > 3
    assert len(make_sample("needle", 3, config, num_images=9).scenes) == 9


def test_splits_are_disjoint() -> None:
    ranges = list(SPLITS.values())
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert a.stop <= b.start or b.stop <= a.start
    assert set(split_seeds("train", 100)).isdisjoint(split_seeds("test", 100))
    with pytest.raises(ValueError):
        split_seeds("validation", len(SPLITS["validation"]) + 1)
    with pytest.raises(ValueError):
        make_sample("cell_colour", 0, num_images=4)


def test_cell_tints_are_distinct_and_unlike_shape_colours() -> None:
    config = TaskConfig()
    tints = [cell_background(r, c, config.grid) for r in range(config.grid) for c in range(config.grid)]
    assert len(set(tints)) == len(tints)
    for tint in tints:
        for rgb in COLOURS.values():
            assert sum((a - b) ** 2 for a, b in zip(tint, rgb)) ** 0.5 > 60
