"""One model under one method configuration, answering an evaluation harness's requests.

Both harness adapters (:mod:`hybridkv.integrations.lm_eval`, :mod:`hybridkv.integrations.lmms_eval`)
send their requests here, and this runs them through the same path as ``hybridkv eval``
(:func:`hybridkv.harness.capture_prefill` then :func:`hybridkv.harness.decode`, which
``tests/test_harness.py`` proves equal to ``with method.apply(model): model.generate(...)``):
a harness score and a ``hybridkv eval`` score of the same prompt come from the same tokens.

Requests run one prompt at a time (the harness's batch size is accepted and ignored): a
prompt's prefill holds every layer's queries, keys and values until its answer is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hybridkv.harness import capture_prefill, decode
from hybridkv.head_profile import HeadProfile
from hybridkv.methods import make_method
from hybridkv.methods.base import Method


def parse_budget(value: float | int | str) -> float | int:
    """``budget=`` of ``--model_args``: a fraction in (0, 1] (``0.1``) or whole tokens per KV head (``512``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"budget={value!r}: give a fraction of the prompt's KV (0.1) or tokens per KV head (512).") from None


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to (not including) the earliest of the ``until`` strings."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


@dataclass
class CompressedRunner:
    """Answers generation and log-likelihood requests under ``method`` at ``budget``.

    Attributes:
        model: a supported transformers model. tokenizer: its tokenizer.
        method: a method name of the registry with options (``HybridKV``, ``SnapKV``,
            ``HybridKV:pool=4``, ``HybridKV-offline``; ``FullKV`` for the uncompressed reference).
        budget: fraction of each prompt's KV in (0, 1], or whole tokens per KV head.
        profile: head profile (``HybridKV-offline``, ``SparseMM``; optional for ``HybridKV``).
        query_tokens: trailing prompt tokens that form the question (None: inferred per prompt).
    """

    model: torch.nn.Module
    tokenizer: object
    method: str = "HybridKV"
    budget: float | int = 0.1
    profile: HeadProfile | None = None
    query_tokens: int | None = None
    _method: Method = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._method = make_method(self.method, self.budget, self.profile)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The end-of-sequence id, when the tokenizer has one."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return () if eos is None else (eos,)

    def generate(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, until: list[str] = (),
                 tail_tokens: int = 0) -> str:
        """Greedy answer of one prompt (batch 1), cut at the first ``until`` string.

        Args:
            inputs: the prompt's model inputs, ``input_ids`` (1, L) and, for a VLM, its pixel tensors.
            tail_tokens: trailing prompt tokens fed after compression (see :mod:`hybridkv.harness`).
        """
        inputs = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        capture = capture_prefill(self.model, inputs, query_tokens=self._query_tokens(inputs, tail_tokens),
                                  tail_tokens=tail_tokens)
        tokens = decode(self.model, self._method, capture, max_new_tokens, stop_ids=self.stop_ids).tokens
        return cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), list(until))

    def loglikelihood(self, inputs: dict[str, torch.Tensor], continuation: torch.Tensor,
                      tail_tokens: int = 0) -> tuple[float, bool]:
        """Log-probability of ``continuation`` after the prompt ``inputs``, read from the compressed prompt.

        The prompt (``input_ids`` (1, L), and a VLM's pixel tensors) is prefilled and compressed
        (but for its last ``tail_tokens``, fed after compression); the logits of its last
        position score the first of the (T,) continuation tokens, and each further one is fed
        through the compressed cache one step at a time (teacher forcing).

        Returns:
            (sum of the continuation's log-probabilities, whether greedy decoding gives it).
        """
        inputs = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        capture = capture_prefill(self.model, inputs, query_tokens=self._query_tokens(inputs, tail_tokens),
                                  tail_tokens=tail_tokens)
        continuation = continuation.cpu()
        logits = decode(self.model, self._method, capture, continuation.shape[0], forced=continuation).logits
        picked = F.log_softmax(logits, dim=-1).gather(1, continuation[:, None])[:, 0]
        return float(picked.sum()), bool((logits.argmax(-1) == continuation).all())

    def _query_tokens(self, inputs: dict[str, torch.Tensor], tail_tokens: int) -> int | None:
        """The configured question length, when the compressed prefix is long enough to hold it."""
        if self.query_tokens is None:
            return None
        prefix = inputs["input_ids"].shape[1] - tail_tokens
        if not 0 <= self.query_tokens < prefix:
            raise ValueError(f"query_tokens={self.query_tokens} does not fit a prompt of {prefix} compressed tokens; "
                             "lower it or leave it out (the question is then inferred).")
        return self.query_tokens
