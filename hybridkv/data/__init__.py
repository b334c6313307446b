"""Procedurally generated data for training and benchmarking (see :mod:`hybridkv.data.visual_tasks`)."""

from hybridkv.data.visual_tasks import (
    COLOURS,
    NEEDLE_SHAPE,
    SHAPES,
    SINGLE_IMAGE_TASKS,
    SPLITS,
    TASKS,
    Item,
    Sample,
    Scene,
    TaskConfig,
    make_sample,
    make_split,
    split_seeds,
    vocabulary,
)

__all__ = [
    "COLOURS",
    "NEEDLE_SHAPE",
    "SHAPES",
    "SINGLE_IMAGE_TASKS",
    "SPLITS",
    "TASKS",
    "Item",
    "Sample",
    "Scene",
    "TaskConfig",
    "make_sample",
    "make_split",
    "split_seeds",
    "vocabulary",
]
