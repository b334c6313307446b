"""The project's own vision-language models that answer the visual tasks, by ``--model`` name.

``tiny-vlm`` is the bundled 4-layer Qwen2.5-VL-architecture toy (:mod:`hybridkv.models.tiny_vlm`);
``coder-vlm`` is Qwen2.5-Coder-1.5B's pretrained decoder behind a trained LLaVA-OneVision vision
path (:mod:`hybridkv.models.coder_vlm`). Both are built without hub access.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import torch

from hybridkv.data.visual_tasks import TaskConfig
from hybridkv.models.coder_vlm import TASK_CONFIG as CODER_BOARDS


@dataclass(frozen=True)
class VisualModel:
    """How to load one of the project's VLMs and prompt it with the visual tasks.

    Attributes:
        name: the ``--model`` name. module: the module with ``build_inputs`` and the loader.
        loader: the loader's name in ``module`` (``dtype=``, ``device=`` keywords).
        weights_keyword: the loader's keyword for the directory its trained weights come from.
        images_end: the token that closes the last image; the ``question-after`` protocol feeds
            everything after it.
        task_config: the boards the model reads.
    """

    name: str
    module: str
    loader: str
    weights_keyword: str
    images_end: str
    task_config: TaskConfig

    def load(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             weights: str | Path | None = None):
        """(model, tokenizer, image processor), in eval mode; the trained weights from ``weights`` (a
        directory the model's training script wrote) instead of the bundled ones when given."""
        where = {} if weights is None else {self.weights_keyword: Path(weights)}
        return getattr(import_module(self.module), self.loader)(dtype=dtype, device=device, **where)

    def build_inputs(self, tokenizer, image_processor, images, question: str) -> dict[str, torch.Tensor]:
        """The batch-1 prompt tensors of ``question`` about ``images``."""
        return import_module(self.module).build_inputs(tokenizer, image_processor, images, question)


VISUAL_MODELS: dict[str, VisualModel] = {
    "tiny-vlm": VisualModel("tiny-vlm", "hybridkv.models.tiny_vlm", "load_tiny_vlm", "path", "<|vision_end|>", TaskConfig()),
    "coder-vlm": VisualModel("coder-vlm", "hybridkv.models.coder_vlm", "load_coder_vlm", "directory", "<|image_pad|>",
                             CODER_BOARDS),
}
"""The models ``hybridkv eval`` / ``profile`` run the visual tasks on."""


def visual_model(name: str) -> VisualModel:
    """The :class:`VisualModel` called ``name``, or a clear error."""
    if name not in VISUAL_MODELS:
        raise ValueError(f"visual tasks run on the project's VLMs: --model {' or '.join(VISUAL_MODELS)}, not {name!r}.")
    return VISUAL_MODELS[name]
