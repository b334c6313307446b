"""A ``hybridkv`` model for lmms-eval (``pip install 'hybridkv[lmms-eval]'``), for the VLM families.

The package declares an ``lmms_eval.models`` entry point
(:mod:`hybridkv.integrations.lmms_eval_plugin`), so once installed lmms-eval's own command
line finds it::

    lmms-eval --model hybridkv --model_args pretrained=tiny-vlm,method=HybridKV,budget=0.1 \\
        --tasks <tasks> --batch_size 1

``--model_args``: ``pretrained`` (``tiny-vlm``, the bundled model, or a vision-language
checkpoint path whose processor has a chat template), ``method`` (a registry name; options
after a colon separated by ``;``: ``method=HybridKV:pool=4;store=host``), ``budget``,
``profile`` (head profile JSON), ``protocol`` (what is fed after compression, as in
``hybridkv eval --protocol``: ``answer-after`` (default), ``question-after``, or ``none`` for
the whole prompt compressed), ``dtype``, ``device``, ``max_new_tokens`` (default answer length).

Each request's visuals (``doc_to_visual``) are PIL images placed before the request's text in
one user turn; the text's ``<image>`` placeholders are dropped, as lmms-eval's Qwen-VL models
do. Greedy generation only; multi-round generation is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    from lmms_eval.api.model import lmms
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError("the lmms-eval adapter needs lmms-eval: pip install 'hybridkv[lmms-eval]'.") from error

from hybridkv.device import DTYPES, resolve_device
from hybridkv.head_profile import HeadProfile
from hybridkv.integrations.runner import CompressedRunner, parse_budget

PROTOCOLS = ("answer-after", "question-after", "none")
"""``protocol=`` values: :data:`hybridkv.data.visual_eval.PROTOCOLS` and ``none`` (no tail)."""


class VisualPrompts:
    """Turns (images, question) into model inputs: the bundled VLM's builder, or a checkpoint's processor.

    Args:
        tokenizer: the model's tokenizer. processor: the tiny VLM's image processor, or a
            checkpoint's ``AutoProcessor``. bundled: whether this is the bundled tiny VLM.
    """

    def __init__(self, tokenizer, processor, bundled: bool) -> None:
        self.tokenizer, self.processor, self.bundled = tokenizer, processor, bundled

    def inputs(self, images: list, question: str) -> dict[str, torch.Tensor]:
        """Model inputs of one user turn: every image, then the question, then the assistant header.

        Returns:
            ``input_ids`` (1, L), ``attention_mask`` (1, L) and the processor's pixel tensors.
        """
        question = question.replace("<image>", "").strip()
        if self.bundled:
            from hybridkv.models.tiny_vlm import build_inputs

            return build_inputs(self.tokenizer, self.processor, images, question)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return dict(self.processor(text=[text], images=images or None, return_tensors="pt"))

    def tail_tokens(self, input_ids: torch.Tensor, protocol: str) -> int:
        """Trailing tokens of ``input_ids`` (1, L) fed after compression under ``protocol``."""
        if protocol == "none":
            return 0
        from hybridkv.data.visual_eval import tail_length

        try:
            return tail_length(self.tokenizer, input_ids, protocol)
        except ValueError as error:
            raise ValueError(f"protocol={protocol} needs a Qwen-style chat prompt (<|im_start|>, <|vision_end|>) and "
                             "did not find its marker in this prompt; use protocol=none.") from error


def load_visual_model(pretrained: str, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer, :class:`VisualPrompts`) for ``tiny-vlm`` or a vision-language checkpoint path."""
    if pretrained == "tiny-vlm":
        from hybridkv.models.tiny_vlm import load_tiny_vlm

        model, tokenizer, image_processor = load_tiny_vlm(dtype=dtype, device=device)
        return model, tokenizer, VisualPrompts(tokenizer, image_processor, bundled=True)
    if not Path(pretrained).is_dir():
        raise ValueError(f"pretrained={pretrained!r}: give tiny-vlm (the bundled model) or a local checkpoint directory.")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(pretrained)
    return model.to(device).eval(), processor.tokenizer, VisualPrompts(processor.tokenizer, processor, bundled=False)


class HybridKVLMMs(lmms):
    """lmms-eval's model interface over a :class:`~hybridkv.integrations.runner.CompressedRunner`.

    Args:
        pretrained: ``tiny-vlm`` or a checkpoint directory. method, budget, profile, protocol:
            see the module docstring. dtype, device: where the model runs.
        max_new_tokens: answer length when a request does not set ``max_new_tokens``.
        batch_size: accepted from lmms-eval's command line; prompts run one at a time.
    """

    is_simple = True

    def __init__(self, pretrained: str = "tiny-vlm", method: str = "HybridKV", budget: float | str = 0.1,
                 profile: str | None = None, protocol: str = "answer-after", dtype: str = "float32",
                 device: str | None = "auto", max_new_tokens: int = 16, batch_size: int | str = 1, **unused) -> None:
        super().__init__()
        if unused:
            raise ValueError(f"unknown --model_args {', '.join(sorted(unused))}; hybridkv takes pretrained, method, budget, "
                             "profile, protocol, dtype, device, max_new_tokens.")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}: choose one of {', '.join(PROTOCOLS)}.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")
        model, tokenizer, self.prompts = load_visual_model(str(pretrained), DTYPES[dtype], resolve_device(device or "auto"))
        self.runner = CompressedRunner(model, tokenizer, str(method).replace(";", ","), parse_budget(budget),
                                       HeadProfile.load(profile) if profile else None)
        self.protocol, self.max_new_tokens = protocol, int(max_new_tokens)

    def _request_inputs(self, context: str, doc_to_visual, doc_id: int, task: str, split: str) -> dict[str, torch.Tensor]:
        """The model inputs of one request: its document's visuals and its text."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [] if visuals is None else list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        if any(not hasattr(v, "convert") for v in visuals):
            raise ValueError("hybridkv's lmms-eval model takes images (PIL) as visuals; this task gave "
                             f"{sorted({type(v).__name__ for v in visuals})}.")
        return self.prompts.inputs([v.convert("RGB") for v in visuals], context)

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, cut at each request's ``until`` strings."""
        from tqdm.auto import tqdm

        answers = []
        for request in tqdm(requests, desc="hybridkv generate", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            kwargs = dict(gen_kwargs)
            if kwargs.get("do_sample", False) and float(kwargs.get("temperature", 1.0)) > 0:
                raise ValueError("hybridkv's lmms-eval model decodes greedily: run the task with do_sample=False.")
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            inputs = self._request_inputs(context, doc_to_visual, doc_id, task, split)
            tail = self.prompts.tail_tokens(inputs["input_ids"], self.protocol)
            answers.append(self.runner.generate(inputs, int(kwargs.get("max_new_tokens", self.max_new_tokens)), until,
                                                tail_tokens=tail))
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of each request's target after its visual prompt, read from the compressed cache."""
        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            inputs = self._request_inputs(context, doc_to_visual, doc_id, task, split)
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self.task_dict[task][split][doc_id])
            continuation = self.runner.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            tail = self.prompts.tail_tokens(inputs["input_ids"], self.protocol)
            results.append(self.runner.loglikelihood(inputs, continuation, tail_tokens=tail))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        """Refused: each round would be a new turn into the compressed cache, which this adapter does not run."""
        raise NotImplementedError("hybridkv's lmms-eval model answers single-round tasks; multi-round tasks are not "
                                  "supported yet.")
