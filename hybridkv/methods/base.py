"""The interface every KV method implements: configuration in, per-prompt plans and per-layer
decisions out (:mod:`hybridkv.decisions`).

A method object is configuration only (a dataclass of its parameters). What it decides for one
prompt lives in a :class:`~hybridkv.decisions.Plan` that the engine creates with
:meth:`Method.plan` and holds; what it decides for one layer is a
:class:`~hybridkv.decisions.Decision` returned by :meth:`Method.compress`. So one method object
can serve several models, prompts and threads at once.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, fields

import torch

from hybridkv.decisions import Decision, LayerContext, Plan
from hybridkv.engine import Engine
from hybridkv.models.architectures import ModelSpec
from hybridkv.report import CacheReport
from hybridkv.spans import PromptSpans


def validate_budget(budget: float | int) -> float | int:
    """Check a budget: a float fraction in (0, 1] of the prompt, or an int >= 1 tokens per KV head."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a float in (0, 1] or an int number of tokens per KV head, got {budget!r}.")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(
            f"budget={budget} is outside (0, 1]: give a fraction of the prompt such as 0.1, "
            "or an int number of tokens per KV head."
        )
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget={budget} tokens per KV head must be >= 1 (or use a float fraction in (0, 1]).")
    return budget


def check_int(name: str, value: object, low: int) -> None:
    """Raise a clear error unless ``value`` is an int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


def check_share(name: str, value: object) -> None:
    """Raise a clear error unless ``value`` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")


_REPORTS = threading.local()


def _reports() -> weakref.WeakKeyDictionary:
    """This thread's last report (or live engine) per method object."""
    if not hasattr(_REPORTS, "by_method"):
        _REPORTS.by_method = weakref.WeakKeyDictionary()
    return _REPORTS.by_method


@dataclass(eq=False)
class Method:
    """Base class of KV methods: a budget, ``apply(model)`` and the last run's ``report``.

    Subclasses are dataclasses of their parameters (validated in ``__post_init__``) and
    implement :meth:`select` (which segment tokens each KV head keeps), or override
    :meth:`compress` to give heads a retrieval pool, and :meth:`plan` for per-prompt decisions.

    Args:
        budget: fraction of the prompt's KV entries to keep, in (0, 1], or an int number of
            prompt tokens per KV head on average.
    """

    budget: float | int = 0.1

    def __post_init__(self) -> None:
        self.budget = validate_budget(self.budget)

    @classmethod
    def parameters(cls) -> list[str]:
        """Names of the constructor parameters."""
        return [f.name for f in fields(cls) if f.init]

    def apply(self, model: torch.nn.Module, query_tokens: int | None = None, *, compile: bool = False,
              min_turn_tokens: int = 256):
        """Context manager that makes ``model`` (unchanged otherwise) use this method's cache.

        Args:
            model: a supported transformers model (see ``hybridkv.SUPPORTED_MODEL_TYPES``).
            query_tokens: for text prompts, the number of trailing prompt tokens that form the
                question (the text-prior queries); inferred when None.
            compile: run each layer's decoding step (retrieval and attention) through
                ``torch.compile(fullgraph=True)``.
            min_turn_tokens: a later multi-token forward into a compressed cache (a new turn) is
                compressed too when it holds visual tokens or at least this many tokens.
        """
        self.check_model(model)
        return Engine(model, self, query_tokens, compile=compile, min_turn_tokens=min_turn_tokens)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model this configuration cannot run on (e.g. another model's head profile)."""

    @property
    def report(self) -> CacheReport | None:
        """The :class:`CacheReport` of this thread's last prompt under ``apply`` (None before any).

        Inside the ``with`` block it describes the cache as it is now; after it, the report
        frozen when the block was left.
        """
        last = _reports().get(self)
        return last.report if last is not None and not isinstance(last, CacheReport) else last

    def publish(self, source: object) -> None:
        """Make ``source`` (a live engine, or a frozen report) what :attr:`report` reads in this thread."""
        _reports()[self] = source

    def plan(self, spec: ModelSpec, spans: PromptSpans, tokens_per_head: int) -> Plan:
        """Per-prompt decisions before any layer is compressed (default: none)."""
        return Plan()

    def survey(self, ctx: LayerContext, plan: Plan) -> None:
        """See one layer before any is compressed, when ``plan.surveys`` (default: nothing)."""

    def select(self, ctx: LayerContext, plan: Plan) -> torch.Tensor:
        """Which segment tokens each KV head keeps: (Hkv, S) bool."""
        raise NotImplementedError

    def compress(self, ctx: LayerContext, plan: Plan) -> Decision:
        """The decision for one layer (default: keep what :meth:`select` keeps)."""
        return Decision(self.select(ctx, plan))
