"""A ``hybridkv`` model for EleutherAI's lm-evaluation-harness (``pip install 'hybridkv[lm-eval]'``).

lm-eval finds models in its own registry and has no plugin entry point for them, so the
command line goes through this module, which registers the model and hands the rest of the
arguments to lm-eval's command line::

    python -m hybridkv.integrations.lm_eval run --model hybridkv \\
        --model_args pretrained=smollm2-135m,method=HybridKV,budget=0.1 --tasks <tasks>

From Python, ``import hybridkv.integrations.lm_eval`` registers it for
``lm_eval.simple_evaluate(model="hybridkv", model_args=...)``.

``--model_args``: ``pretrained`` (a name of :data:`hybridkv.models.KNOWN_MODELS` or a
checkpoint path), ``method`` (a registry name; options after a colon, separated by ``;``
because lm-eval splits the arguments at commas: ``method=HybridKV:pool=4;store=host``),
``budget`` (fraction or tokens per KV head), ``profile`` (head profile JSON), ``query_tokens``
(trailing prompt tokens that form the question; inferred when absent), ``dtype``, ``device``,
``max_gen_toks`` (default answer length). Greedy generation only; ``loglikelihood_rolling``
(perplexity tasks) is refused, since compression needs a prompt that ends before what is scored.
"""

from __future__ import annotations

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'hybridkv[lm-eval]'.") from error

from hybridkv.device import DTYPES, resolve_device
from hybridkv.head_profile import HeadProfile
from hybridkv.integrations.runner import CompressedRunner, parse_budget


@register_model("hybridkv")
class HybridKVLM(TemplateLM):
    """lm-eval's model interface over a :class:`~hybridkv.integrations.runner.CompressedRunner`.

    Args:
        pretrained: a known model name (``smollm2-135m``, ``qwen2.5-coder-1.5b``) or a checkpoint path.
        method, budget, profile, query_tokens: see the module docstring.
        dtype: ``float32``, ``bfloat16`` or ``float16``. device: ``auto``, ``cpu``, ``cuda:0``, ...
        max_gen_toks: answer length when a task does not set one.
        batch_size, max_batch_size: accepted from lm-eval's command line; prompts run one at a time.
    """

    def __init__(self, pretrained: str, method: str = "HybridKV", budget: float | str = 0.1, profile: str | None = None,
                 query_tokens: int | None = None, dtype: str = "float32", device: str | None = "auto",
                 max_gen_toks: int = 256, batch_size: int | str | None = 1, max_batch_size: int | None = None) -> None:
        super().__init__()
        from hybridkv.models.loading import load_model

        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")
        model, self.tokenizer = load_model(str(pretrained), DTYPES[dtype], resolve_device(device or "auto"))
        self.runner = CompressedRunner(model, self.tokenizer, str(method).replace(";", ","), parse_budget(budget),
                                       HeadProfile.load(profile) if profile else None,
                                       None if query_tokens is None else int(query_tokens))
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's end-of-sequence id (lm-eval's context for an empty prompt)."""
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string`` (the tokenizer's own special-token default when None)."""
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer(string, **extra)["input_ids"]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each request's ``(_, context ids, continuation ids)`` scored under the method."""
        from tqdm.auto import tqdm

        results = []
        for _, context, continuation in tqdm(requests, desc="hybridkv loglikelihood", disable=disable_tqdm):
            ids = torch.tensor([context])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            results.append(self.runner.loglikelihood(inputs, torch.tensor(continuation)))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Refused: a rolling perplexity has no prompt to compress before what it scores."""
        raise NotImplementedError(
            "hybridkv compresses a prompt's KV at the end of its prefill and scores what follows; perplexity tasks "
            "(loglikelihood_rolling) score every token of a document and have no prompt. Run them with lm-eval's "
            "'hf' model, or use generate_until / multiple-choice tasks."
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers, cut at each request's ``until`` strings."""
        from tqdm.auto import tqdm

        answers = []
        for request in tqdm(requests, desc="hybridkv generate", disable=disable_tqdm):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            if kwargs.pop("do_sample", False) and float(kwargs.get("temperature", 1.0)) > 0:
                raise ValueError("hybridkv's lm-eval model decodes greedily: run the task with do_sample=False.")
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            inputs = self.tokenizer(context, return_tensors="pt")
            new_tokens = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            answers.append(self.runner.generate(dict(inputs), new_tokens, until))
        return answers


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
