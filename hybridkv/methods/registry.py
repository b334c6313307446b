"""Name -> method class, the one place the CLI, evaluation, benchmarks and tests find methods.

A method registers itself with :func:`register` in its own module under
``hybridkv/methods/``; :mod:`hybridkv.methods` imports every module of the package, so adding
a method is adding one file.
"""

from __future__ import annotations

from hybridkv.methods.base import Method

REGISTRY: dict[str, type[Method]] = {}
"""Registered method classes by name (the class name)."""

OFFLINE_SUFFIX = "-offline"
"""``HybridKV-offline`` names HybridKV with the head profile given to :func:`make_method`."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to :data:`REGISTRY` under its class name."""
    if cls.__name__ in REGISTRY and REGISTRY[cls.__name__] is not cls:
        raise ValueError(f"two methods are named {cls.__name__}.")
    REGISTRY[cls.__name__] = cls
    return cls


def needs_profile(name: str) -> bool:
    """Whether the method spec ``name`` (``Name[:options]``) needs a head profile to run."""
    base = name.partition(":")[0]
    if base.endswith(OFFLINE_SUFFIX):
        return True
    cls = REGISTRY.get(base)
    return cls is not None and getattr(cls, "needs_profile", False)


def parse_options(text: str) -> dict:
    """``"pool=4,store=host"`` -> ``{"pool": 4, "store": "host"}`` (ints, floats, True/False and None parsed)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"method option {item!r} is not key=value (e.g. HybridKV:pool=4,store=host).")
        if value in ("None", "True", "False"):
            options[key] = {"None": None, "True": True, "False": False}[value]
            continue
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return options


def make_method(spec: str, budget: float | int = 0.1, profile=None) -> Method:
    """A method from its table name: ``Name[:key=value,...]`` (e.g. ``HybridKV:pool=4``).

    ``HybridKV-offline`` is HybridKV given ``profile``; SparseMM also takes ``profile``.
    Unknown names and parameters are errors that list the known ones.
    """
    name, _, text = spec.partition(":")
    options = parse_options(text)
    base = name[: -len(OFFLINE_SUFFIX)] if name.endswith(OFFLINE_SUFFIX) else name
    cls = REGISTRY.get(base)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))} (and HybridKV-offline).")
    known = cls.parameters()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{base} has no parameter {', '.join(unknown)}; its parameters: {', '.join(known)}.")
    if needs_profile(name):
        if profile is None:
            raise ValueError(f"{name} needs a head profile of the model (hybridkv profile --model ...).")
        options["profile"] = profile
    if "budget" in known:
        options.setdefault("budget", budget)
    return cls(**options)

