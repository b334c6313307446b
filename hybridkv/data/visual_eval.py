"""Visual question tasks (:mod:`hybridkv.data.visual_tasks`) as evaluation tasks for the tiny VLM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridkv.data.visual_tasks import Sample, make_sample, split_seeds


@dataclass
class VisualTask:
    """One visual question with its prompt tensors (see :class:`hybridkv.evaluation.EvalTask`).

    Attributes:
        sample: the generated question. length: visual tokens in the prompt.
        depth: relative position of the answer's image among the images (0 for one image).
    """

    sample: Sample
    prompt: dict[str, torch.Tensor] = field(repr=False)
    length: int = 0
    depth: float = 0.0
    query_tokens: int | None = None

    @property
    def key(self) -> str:
        """Stable identifier (task, seed, images)."""
        return f"{self.sample.task}-s{self.sample.seed}-n{len(self.sample.scenes)}"

    @property
    def kind(self) -> str:
        """The visual task name."""
        return self.sample.task

    @property
    def answer(self) -> str:
        """The single-word answer."""
        return self.sample.answer

    def inputs(self) -> dict[str, torch.Tensor]:
        """The processor outputs of the prompt."""
        return self.prompt

    def is_correct(self, generated: str) -> bool:
        """True when the first generated word is the answer."""
        words = generated.split()
        return bool(words) and words[0] == self.answer


def visual_tasks(tokenizer, image_processor, kinds: list[str], per_kind: int, split: str = "test",
                 num_images: int | None = None) -> list[VisualTask]:
    """``per_kind`` tasks of each kind from ``split``, with the tiny VLM's prompt tensors."""
    from hybridkv.models.tiny_vlm import build_inputs

    tasks = []
    for kind in kinds:
        for seed in split_seeds(split, per_kind):
            sample = make_sample(kind, seed, num_images=num_images if kind == "needle" else None)
            prompt = build_inputs(tokenizer, image_processor, sample.images(), sample.question)
            visual = int((prompt["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
            depth = sample.target[0] / max(1, len(sample.scenes) - 1) if sample.target else 0.0
            tasks.append(VisualTask(sample, prompt, visual, depth))
    return tasks
