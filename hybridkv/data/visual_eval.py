"""Visual question tasks (:mod:`hybridkv.data.visual_tasks`) as evaluation tasks for the tiny VLM.

The answers are one word, so the first answer token must read the compressed cache for the
table to measure anything: with the whole prompt prefilled, that token comes from the
full-attention prefill, the same for every method. Each task therefore says which trailing
prompt tokens are fed *after* compression (``tail_tokens``), by protocol:

- ``"answer-after"`` (default, the paper's setting): the images and the question are
  compressed (the question is the text prior); the assistant header
  ``<|im_start|>assistant\n`` is fed after, and its last position, which predicts the answer,
  reads the compressed cache.
- ``"question-after"`` (question-agnostic, as kvpress evaluates): only the images are
  compressed, with no question to guide them; the question and the assistant header are fed
  after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridkv.data.visual_tasks import Sample, make_sample, split_seeds

PROTOCOLS = ("answer-after", "question-after")
"""What is fed after compression; see the module docstring."""


@dataclass
class VisualTask:
    """One visual question with its prompt tensors (see :class:`hybridkv.evaluation.EvalTask`).

    Attributes:
        sample: the generated question. length: visual tokens in the prompt.
        depth: relative position of the answer's image among the images (0 for one image).
        tail_tokens: trailing prompt tokens fed after compression (see :data:`PROTOCOLS`).
        protocol: the protocol that set ``tail_tokens``.
    """

    sample: Sample
    prompt: dict[str, torch.Tensor] = field(repr=False)
    length: int = 0
    depth: float = 0.0
    query_tokens: int | None = None
    tail_tokens: int = 0
    protocol: str = "answer-after"

    @property
    def key(self) -> str:
        """Stable identifier (task, seed, images, protocol)."""
        return f"{self.sample.task}-s{self.sample.seed}-n{len(self.sample.scenes)}-{self.protocol}"

    @property
    def kind(self) -> str:
        """The visual task name; for ``needle`` with its number of images (``needle-8``)."""
        task = self.sample.task
        return f"{task}-{len(self.sample.scenes)}" if task == "needle" else task

    @property
    def answer(self) -> str:
        """The single-word answer."""
        return self.sample.answer

    def inputs(self) -> dict[str, torch.Tensor]:
        """The processor outputs of the prompt."""
        return self.prompt

    def is_correct(self, generated: str) -> bool:
        """See :func:`answer_matches`."""
        return answer_matches(generated, self.answer)


def answer_matches(generated: str, answer: str) -> bool:
    """True when the first generated word is the one-word ``answer`` (case and trailing punctuation aside)."""
    words = generated.split()
    return bool(words) and words[0].lower().rstrip(".,;:!") == answer


def tail_length(tokenizer, input_ids: torch.Tensor, protocol: str, images_end: str = "<|vision_end|>") -> int:
    """Trailing tokens of a Qwen chat prompt (1, L) to feed after compression under ``protocol``:
    the assistant header (``answer-after``), or everything after the last ``images_end`` token
    (``question-after``; Qwen-VL's ``<|vision_end|>``, a LLaVA-OneVision prompt's last image token)."""
    from hybridkv.models.tiny_vlm import IM_START

    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}.")
    ids = input_ids[0].tolist()
    marker = IM_START if protocol == "answer-after" else images_end
    last = len(ids) - 1 - ids[::-1].index(tokenizer.convert_tokens_to_ids(marker))
    return len(ids) - last if protocol == "answer-after" else len(ids) - last - 1


def visual_tasks(tokenizer, image_processor, kinds: list[str], per_kind: int, split: str = "test",
                 num_images: list[int | None] | int | None = None, protocol: str = "answer-after",
                 model: str = "tiny-vlm") -> list[VisualTask]:
    """``per_kind`` tasks of each kind from ``split``, with the prompt tensors of ``model``.

    Args:
        num_images: images per ``needle`` prompt; a list gives ``per_kind`` needle tasks per
            count (None: drawn per sample, in the model's board config's range).
        protocol: what is fed after compression (:data:`PROTOCOLS`).
        model: a :data:`hybridkv.models.visual_models.VISUAL_MODELS` name (its boards and prompts).
    """
    from hybridkv.models.tiny_vlm import IMAGE_PAD
    from hybridkv.models.visual_models import visual_model

    vlm = visual_model(model)
    counts = num_images if isinstance(num_images, list) else [num_images]
    tasks = []
    for kind, images in [(k, n) for k in kinds for n in (counts if k == "needle" else [None])]:
        for seed in split_seeds(split, per_kind):
            sample = make_sample(kind, seed, vlm.task_config, num_images=images)
            prompt = vlm.build_inputs(tokenizer, image_processor, sample.images(), sample.question)
            visual = int((prompt["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).sum())
            depth = sample.target[0] / max(1, len(sample.scenes) - 1) if sample.target else 0.0
            tail = tail_length(tokenizer, prompt["input_ids"], protocol, vlm.images_end)
            tasks.append(VisualTask(sample, prompt, visual, depth, tail_tokens=tail, protocol=protocol))
    return tasks
