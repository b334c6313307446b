"""Bytes a cache really holds, counted from its tensors' storages."""

from __future__ import annotations

import torch


def held_bytes(obj: object) -> dict[str, int]:
    """Bytes of the distinct tensor storages referenced by ``obj``'s attributes, by device type.

    Walks the attributes of ``obj`` (and of lists, tuples, dicts and objects with ``__dict__``
    one level below it, e.g. a retriever), counting every storage once, so views and
    preallocated slack are counted as the allocation they belong to.

    Returns:
        ``{"cpu": bytes, "cuda": bytes, ...}`` for every device type holding something.
    """
    seen: set[int] = set()
    out: dict[str, int] = {}

    def visit(value: object, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                return
            seen.add(storage.data_ptr())
            out[value.device.type] = out.get(value.device.type, 0) + storage.nbytes()
        elif depth > 0 and isinstance(value, (list, tuple)):
            for item in value:
                visit(item, depth - 1)
        elif depth > 0 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth - 1)
        elif depth > 0 and hasattr(value, "__dict__") and not isinstance(value, type):
            for item in vars(value).values():
                visit(item, depth - 1)

    visit(obj, 3)
    return out
