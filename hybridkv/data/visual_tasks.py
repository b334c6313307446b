"""Procedurally generated visual question answering tasks.

Every sample is a small scene description (a grid of cells, some holding a coloured
shape) rendered with PIL, plus a question whose single-word answer is correct by
construction. The answer depends on specific image regions, which makes these tasks a
multimodal accuracy benchmark for KV-cache compression: a method that drops the visual
tokens of the named cell (or of the needle image) loses the answer.

Tasks (``TASKS``):

- ``cell_colour``: one image; "what colour is the shape in row 2 column c ?" -> a colour.
- ``cell_shape``: one image; "what shape is in row 2 column c ?" -> a shape.
- ``count``: one image; "how many red shapes are there ?" -> a digit.
- ``needle``: ``min_images``..``max_images`` images (a haystack); exactly one cell of
  one image holds a star (``NEEDLE_SHAPE``), a shape that occurs nowhere else; the
  question names it: "what colour is the star ?" -> a colour. The answer lives in a
  single cell of a single image among many.

Boards (``TaskConfig`` defaults): 3x3 cells of 56 px on a 168 px image, 3 to 7 shapes,
4 colours x 4 shapes; each cell has a coordinate tint (:func:`cell_background`). With
Qwen2.5-VL's 14 px patches and 2x2 merge every cell is exactly 2x2 visual tokens.

In question text rows are numbered from 1 (row 1 is the top row) and columns lettered
from ``a`` (column a is the left column), like a spreadsheet, so that the two coordinates
are different words; the dataclasses use 0-based indices. Generation is deterministic
per ``(task, seed)`` and independent of global random state; the ``train`` /
``validation`` / ``test`` splits use disjoint seed ranges (``SPLITS``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 48, 39),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
}
"""Colour names and their nominal RGB values (rendering adds a small jitter)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
"""Shapes of ordinary (haystack) items."""

NEEDLE_SHAPE = "star"
"""Shape that occurs only once per ``needle`` sample."""

TASKS: tuple[str, ...] = ("cell_colour", "cell_shape", "count", "needle")
"""Task names accepted by :func:`make_sample`."""

SINGLE_IMAGE_TASKS: tuple[str, ...] = ("cell_colour", "cell_shape", "count")
"""Tasks whose samples hold exactly one image."""

SPLITS: dict[str, range] = {
    "train": range(100_000_000),
    "validation": range(100_000_000, 100_100_000),
    "test": range(200_000_000, 200_100_000),
}
"""Disjoint seed ranges of the data splits."""

BACKGROUND = (123, 117, 104)
"""Mean board colour: the CLIP normalisation mean used by Qwen2-VL's image processor, so
empty regions normalise to about zero and shapes stand out in the vision tower's input."""

ROW_TINT = 60
"""Brightness step range of the coordinate tint: cell backgrounds go from ``-ROW_TINT``
(top row) to ``+ROW_TINT`` (bottom row) grey levels around ``BACKGROUND``."""

COLUMN_TINT = 45
"""Hue range of the coordinate tint: from ``-COLUMN_TINT`` (left column) to ``+COLUMN_TINT``
(right column) along a blue-to-orange axis (+red, -blue)."""

GRID_LINE = (80, 80, 80)
COLOUR_JITTER = 18
"""Maximum per-channel deviation (in 0..255 units) of a rendered colour from nominal."""

QUESTION_TEMPLATES: dict[str, str] = {
    "cell_colour": "what colour is the shape in row {row} column {col} ?",
    "cell_shape": "what shape is in row {row} column {col} ?",
    "count": "how many {colour} shapes are there ?",
    "needle": "what colour is the " + NEEDLE_SHAPE + " ?",
}
"""Question text per task; placeholders take a row number, a column letter or a colour."""

COLUMN_NAMES = "abcdefghijklmnopqrstuvwxyz"
"""Column letters in question text (``COLUMN_NAMES[col]``); boards have at most 26 columns."""


@dataclass(frozen=True)
class TaskConfig:
    """Geometry and difficulty knobs shared by all tasks.

    Attributes:
        grid: cells per side; the image is a ``grid x grid`` board.
        image_size: side of the square image in pixels. With Qwen2.5-VL (14 px patches,
            2x2 merge) a 168 px image gives 36 visual tokens (112 px: 16, 224 px: 64); an
            ``image_size / grid`` that is a multiple of 28 aligns every cell with whole
            visual tokens (168 / 3 = 56 px: 2x2 tokens per cell).
        min_items: fewest occupied cells per image.
        max_items: most occupied cells per image.
        min_images: fewest images of a ``needle`` sample.
        max_images: most images of a ``needle`` sample.
    """

    grid: int = 3
    image_size: int = 168
    min_items: int = 3
    max_items: int = 7
    min_images: int = 4
    max_images: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.min_items <= self.max_items <= self.grid * self.grid:
            raise ValueError(f"need 1 <= min_items <= max_items <= grid**2, got {self}")
        if not 1 <= self.grid <= len(COLUMN_NAMES):
            raise ValueError(f"grid must be in 1..{len(COLUMN_NAMES)}, got {self.grid}")
        if not 1 <= self.min_images <= self.max_images:
            raise ValueError(f"need 1 <= min_images <= max_images, got {self}")


@dataclass(frozen=True)
class Item:
    """One shape in one cell, with the jitter needed to render it exactly.

    Attributes:
        row: 0-based row (0 = top).
        col: 0-based column (0 = left).
        colour: key of ``COLOURS``.
        shape: one of ``SHAPES`` or ``NEEDLE_SHAPE``.
        rgb: rendered fill colour (nominal colour plus jitter).
        scale: shape size as a fraction of the cell side.
        dx: horizontal offset of the shape centre from the cell centre, fraction of the cell side.
        dy: vertical offset, fraction of the cell side.
    """

    row: int
    col: int
    colour: str
    shape: str
    rgb: tuple[int, int, int]
    scale: float
    dx: float
    dy: float


@dataclass(frozen=True)
class Scene:
    """A ``grid x grid`` board with at most one item per cell.

    Attributes:
        grid: cells per side.
        image_size: image side in pixels.
        items: the occupied cells, in row-major order.
    """

    grid: int
    image_size: int
    items: tuple[Item, ...]

    def item_at(self, row: int, col: int) -> Item | None:
        """The item in cell (``row``, ``col``) (0-based), or None if the cell is empty."""
        for item in self.items:
            if item.row == row and item.col == col:
                return item
        return None

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        """Number of items matching ``colour`` and ``shape`` (None matches anything)."""
        return sum(
            (colour is None or it.colour == colour) and (shape is None or it.shape == shape) for it in self.items
        )

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Pixel box ``(left, top, right, bottom)`` (right/bottom exclusive) of a cell."""
        cell = self.image_size / self.grid
        return (
            round(col * cell),
            round(row * cell),
            round((col + 1) * cell),
            round((row + 1) * cell),
        )

    def render(self) -> Image.Image:
        """Draw the scene: an RGB image of ``image_size x image_size`` pixels."""
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        cell = self.image_size / self.grid
        for row in range(self.grid):
            for col in range(self.grid):
                left, top, right, bottom = self.cell_box(row, col)
                draw.rectangle(
                    [left, top, right - 1, bottom - 1],
                    fill=cell_background(row, col, self.grid),
                )
        for k in range(1, self.grid):
            p = round(k * cell)
            draw.line([(p, 0), (p, self.image_size - 1)], fill=GRID_LINE, width=1)
            draw.line([(0, p), (self.image_size - 1, p)], fill=GRID_LINE, width=1)
        for item in self.items:
            cx = (item.col + 0.5 + item.dx) * cell
            cy = (item.row + 0.5 + item.dy) * cell
            _draw_shape(draw, item.shape, cx, cy, item.scale * cell / 2, item.rgb)
        return image


@dataclass(frozen=True)
class Sample:
    """One question about one or more scenes.

    Attributes:
        task: one of ``TASKS``.
        seed: the seed it was generated from.
        scenes: the images' descriptions, in prompt order.
        question: the question text (words and punctuation separated by single spaces).
        answer: the single-word answer (a colour, a shape or a digit string).
        target: ``(image_index, row, col)`` (0-based) of the cell that holds the answer,
            or None when the answer aggregates over the image (``count``).
    """

    task: str
    seed: int
    scenes: tuple[Scene, ...]
    question: str
    answer: str
    target: tuple[int, int, int] | None = field(default=None)

    def images(self) -> list[Image.Image]:
        """Render every scene, in prompt order."""
        return [scene.render() for scene in self.scenes]


def cell_background(row: int, col: int, grid: int) -> tuple[int, int, int]:
    """Background colour of cell (``row``, ``col``) (0-based) of a ``grid x grid`` board.

    A coordinate tint, as on a printed game board: brightness encodes the row and a
    blue-to-orange hue shift encodes the column (channels clipped to 0..255). Qwen2.5-VL's
    vision tower has only relative (2D rotary) position information and M-RoPE gives the
    width axis its lowest frequencies, so a tiny model trained for minutes on a CPU did
    not learn where a cell is from positions alone; the tint lets it find a named cell by
    content, while the answer (the shape and its colour) still has to be read from that
    cell's visual tokens. Tints stay far from the saturated shape colours.
    """
    span = max(grid - 1, 1)
    light = round(ROW_TINT * (2 * row / span - 1))
    hue = round(COLUMN_TINT * (2 * col / span - 1))
    r, g, b = BACKGROUND
    return tuple(min(255, max(0, v)) for v in (r + light + hue, g + light, b + light - hue))


def vocabulary(config: TaskConfig = TaskConfig()) -> list[str]:
    """Every word that a question or an answer of any task can contain, sorted.

    Numbers cover the rows and every possible count (0..grid**2); letters cover the columns.
    """
    words: set[str] = set(COLOURS) | set(SHAPES) | {NEEDLE_SHAPE}
    for template in QUESTION_TEMPLATES.values():
        words.update(w for w in template.split() if not w.startswith("{"))
    words.update(str(n) for n in range(config.grid * config.grid + 1))
    words.update(COLUMN_NAMES[: config.grid])
    return sorted(words)


def make_sample(
    task: str,
    seed: int,
    config: TaskConfig = TaskConfig(),
    num_images: int | None = None,
) -> Sample:
    """Generate the sample of ``task`` for ``seed`` (deterministic in ``task``, ``seed``, ``config``).

    Args:
        task: one of ``TASKS``.
        seed: any integer; use :func:`split_seeds` for split-disjoint seeds.
        config: geometry and difficulty.
        num_images: ``needle`` only: haystack size (default: drawn from
            ``config.min_images..config.max_images``). Must be None for other tasks.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if num_images is not None and task != "needle":
        raise ValueError(f"num_images applies to the 'needle' task only, not {task!r}")
    rng = random.Random(f"{task}:{seed}")
    if task == "needle":
        return _make_needle(rng, seed, config, num_images)
    scene = _random_scene(rng, config)
    template = QUESTION_TEMPLATES[task]
    if task == "count":
        colour = rng.choice(sorted(COLOURS))
        question = template.format(colour=colour)
        return Sample(task, seed, (scene,), question, str(scene.count(colour=colour)), None)
    item = rng.choice(scene.items)
    question = template.format(row=item.row + 1, col=COLUMN_NAMES[item.col])
    answer = item.colour if task == "cell_colour" else item.shape
    return Sample(task, seed, (scene,), question, answer, (0, item.row, item.col))


def split_seeds(split: str, n: int, offset: int = 0) -> range:
    """The ``n`` seeds of ``split`` starting ``offset`` seeds into its range."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {tuple(SPLITS)}")
    seeds = SPLITS[split]
    if offset < 0 or offset + n > len(seeds):
        raise ValueError(f"split {split!r} holds {len(seeds)} seeds; asked for [{offset}, {offset + n})")
    return seeds[offset : offset + n]


def make_split(
    split: str,
    task: str,
    n: int,
    config: TaskConfig = TaskConfig(),
    offset: int = 0,
    num_images: int | None = None,
) -> list[Sample]:
    """``n`` samples of ``task`` from ``split`` (seeds ``split_seeds(split, n, offset)``)."""
    return [make_sample(task, seed, config, num_images) for seed in split_seeds(split, n, offset)]


def _random_item(rng: random.Random, row: int, col: int, shape: str) -> Item:
    """An item of random colour and jitter in cell (row, col)."""
    colour = rng.choice(sorted(COLOURS))
    rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    scale = rng.uniform(0.6, 0.8)
    slack = (1.0 - scale) / 2 - 0.04
    return Item(
        row,
        col,
        colour,
        shape,
        rgb,
        scale,
        rng.uniform(-slack, slack),
        rng.uniform(-slack, slack),
    )


def _random_scene(rng: random.Random, config: TaskConfig) -> Scene:
    """A board with ``min_items..max_items`` ordinary shapes in random cells."""
    cells = [(r, c) for r in range(config.grid) for c in range(config.grid)]
    chosen = sorted(rng.sample(cells, rng.randint(config.min_items, config.max_items)))
    items = tuple(_random_item(rng, r, c, rng.choice(SHAPES)) for r, c in chosen)
    return Scene(config.grid, config.image_size, items)


def _make_needle(rng: random.Random, seed: int, config: TaskConfig, num_images: int | None) -> Sample:
    """A haystack of scenes where the star replaces one random item of one random scene."""
    n = rng.randint(config.min_images, config.max_images) if num_images is None else num_images
    if n < 1:
        raise ValueError(f"num_images must be >= 1, got {n}")
    scenes = [_random_scene(rng, config) for _ in range(n)]
    index = rng.randrange(n)
    items = list(scenes[index].items)
    k = rng.randrange(len(items))
    row, col = items[k].row, items[k].col
    items[k] = _random_item(rng, row, col, NEEDLE_SHAPE)
    scenes[index] = Scene(config.grid, config.image_size, tuple(items))
    return Sample(
        "needle",
        seed,
        tuple(scenes),
        QUESTION_TEMPLATES["needle"],
        items[k].colour,
        (index, row, col),
    )


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    rgb: tuple[int, int, int],
) -> None:
    """Fill ``shape`` of half-size ``r`` pixels centred at (cx, cy); the centre pixel is always filled."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=rgb)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    elif shape == NEEDLE_SHAPE:
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")
