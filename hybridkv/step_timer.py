"""Decoding steps timed inside ``model.generate()``: a stopping criterion stamps every step.

The difference of two consecutive stamps is one decoding step as a user's ``generate()`` runs
it (forward, logits processing, token selection), with nothing of the prefill in it; the
median over steps is the figure the benchmarks report. Stamps wait for the device (CUDA).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StoppingCriteria

from hybridkv.device import now


class StepTimer(StoppingCriteria):
    """Records the time after every forward of ``generate()``; never stops generation."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.stamps.append(now(self.device))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def step_ms(self) -> list[float]:
        """Milliseconds of every step after the first token (one per stamp after the first)."""
        return [1000 * (b - a) for a, b in zip(self.stamps, self.stamps[1:])]


@dataclass
class TimedRun:
    """One timed ``generate()``.

    Attributes:
        prefill_s: seconds from the call to the first token (prefill, tail, first sampling).
        step_ms: milliseconds of every later decoding step. tokens: (B, T) generated ids.
        cache: the cache after the run.
    """

    prefill_s: float
    step_ms: list[float]
    tokens: torch.Tensor
    cache: DynamicCache

    @property
    def median_ms(self) -> float:
        """Median decoding step in milliseconds."""
        return statistics.median(self.step_ms)


def timed_generate(model: torch.nn.Module, inputs: dict, new_tokens: int, tail_tokens: int = 0,
                   cache: DynamicCache | None = None) -> TimedRun:
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens with every step stamped (an
    end-of-sequence token does not stop it; callers cut the answer there).

    Args:
        inputs: processor outputs on the model's device.
        tail_tokens: trailing prompt tokens fed by ``generate()`` after the rest was prefilled
            (and compressed) by a plain forward, so the first answer token reads the compressed
            cache; the prefill time includes that forward.
        cache: a cache already holding the prompt but its last token (``inputs`` is then the
            whole prompt); None starts from an empty one.
    """
    from hybridkv.harness import split_tail

    device = model.device
    start = now(device)
    if cache is None:
        cache = DynamicCache()
        prefix, tail = split_tail(model, inputs, tail_tokens)
        if tail is not None:
            with torch.inference_mode():
                model(**prefix, past_key_values=cache, use_cache=True)
            inputs = {"input_ids": inputs["input_ids"], "attention_mask": torch.ones_like(inputs["input_ids"])}
    timer = StepTimer(device)
    with torch.inference_mode():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, stopping_criteria=[timer], return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    return TimedRun(timer.stamps[0] - start, timer.step_ms(), out.sequences[:, prompt:], out.past_key_values)
