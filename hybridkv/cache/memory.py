"""Bytes a cache really holds, counted from its tensors' storages."""

from __future__ import annotations

import torch


def held_bytes(layer: object) -> dict[str, int]:
    """Bytes of the distinct tensor storages a cache layer holds, by device type.

    Counts every tensor attribute of the layer and of its retriever (the chunk pool), each
    storage once, so views and preallocated slack are counted as the allocation they belong to.

    Returns:
        ``{"cpu": bytes, "cuda": bytes, ...}`` for every device type holding something.
    """
    seen: set[int] = set()
    out: dict[str, int] = {}
    owners = [layer, getattr(layer, "retriever", None)]
    for owner in filter(None, owners):
        for value in vars(owner).values():
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            out[value.device.type] = out.get(value.device.type, 0) + storage.nbytes()
    return out
