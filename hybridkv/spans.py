"""Where the visual (context) tokens and the text-prior queries are in a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv.models.architectures import ModelSpec

DEFAULT_QUERY_WINDOW = 32

MIN_QUESTION_TOKENS = 2
"""Fewest tokens after the last visual token that make a question: less is no text at all, or
only the image-end delimiter (Qwen-VL's ``<|vision_end|>``), as when the images are compressed
before the question arrives (question-agnostic compression)."""


@dataclass(frozen=True)
class PromptSpans:
    """Modality spans of one prompt (batch size 1).

    Attributes:
        prompt_len: tokens in the prompt (L).
        visual: (L,) bool, image/video placeholder positions (all False for text models).
        context: (L,) bool, the span that plays the visual role: the visual tokens for a
            multimodal prompt; for a text prompt everything before the query span.
        query_start: the text-prior queries are positions ``[query_start, L)``.
        query_source: how the query span was found: ``"after_visual"`` (text after the last
            visual token), ``"query_tokens"`` (explicit ``apply(model, query_tokens=N)``),
            ``"user_turn"`` (the last chat turn), ``"window"`` (the last
            :data:`DEFAULT_QUERY_WINDOW` tokens, when nothing better is known) or ``"none"``
            (the prompt holds no question: ``query_tokens=0``, or a multimodal prompt that ends
            with its images, under :data:`MIN_QUESTION_TOKENS` after them; the span is the
            window, and methods may score tokens without a text prior).
    """

    prompt_len: int
    visual: torch.Tensor
    context: torch.Tensor
    query_start: int
    query_source: str

    @property
    def visual_tokens(self) -> int:
        """Number of image/video placeholder tokens."""
        return int(self.visual.sum())

    @property
    def query_len(self) -> int:
        """Number of text-prior query tokens."""
        return self.prompt_len - self.query_start


def find_spans(input_ids: torch.Tensor | None, prompt_len: int, spec: ModelSpec, query_tokens: int | None) -> PromptSpans:
    """Locate visual tokens and the text-prior query span of a prompt.

    Args:
        input_ids: (1, L) prompt ids, or None when the model got ``inputs_embeds`` only.
        prompt_len: L.
        spec: the model's :class:`ModelSpec` (visual and turn-end token ids).
        query_tokens: explicit number of trailing query tokens, 0 when the prompt holds no
            question (it comes after compression), or None to infer.
    """
    if query_tokens is not None and not 0 <= query_tokens < prompt_len:
        raise ValueError(
            f"query_tokens={query_tokens} must be between 0 and the prompt length minus one ({prompt_len - 1}); "
            "pass the number of tokens of the trailing question (0: the prompt holds none)."
        )
    ids = input_ids[0] if input_ids is not None else None
    visual = torch.zeros(prompt_len, dtype=torch.bool)
    if spec.is_multimodal and ids is not None and spec.visual_token_ids:
        visual = torch.isin(ids, torch.tensor(spec.visual_token_ids, device=ids.device)).cpu()
    positions = torch.arange(prompt_len)
    if query_tokens == 0:
        start, source = _window_start(prompt_len), "none"
    elif query_tokens is not None:
        start, source = prompt_len - query_tokens, "query_tokens"
    elif visual.any():
        start, source = int(positions[visual].max()) + 1, "after_visual"
        if prompt_len - start < MIN_QUESTION_TOKENS:
            start, source = _window_start(prompt_len), "none"
    else:
        start, source = _user_turn_start(ids, prompt_len, spec)
    context = visual.clone() if visual.any() else positions < start
    return PromptSpans(prompt_len, visual, context, start, source)


def _window_start(prompt_len: int) -> int:
    return max(1, prompt_len - DEFAULT_QUERY_WINDOW)


def _user_turn_start(ids: torch.Tensor | None, prompt_len: int, spec: ModelSpec) -> tuple[int, str]:
    """Start of the last chat turn (after the second-to-last turn end) when it is a short question.

    A turn longer than half the prompt holds the context itself, so the trailing window is used.
    """
    if ids is not None and spec.turn_end_ids:
        ends = torch.isin(ids.cpu(), torch.tensor(spec.turn_end_ids)).nonzero().flatten()
        if len(ends) >= 2:
            start = int(ends[-2]) + 1
            if prompt_len - start <= prompt_len // 2:
                return start, "user_turn"
    return _window_start(prompt_len), "window"
