"""Long-context retrieval tasks built offline from real text (the licence texts every Debian
system ships under ``/usr/share/common-licenses``).

* **needle**: a 5-digit pass key sentence inserted at a relative depth of a haystack of real
  text of a given token length; the question asks for the key.
* **multi-key**: several "The code for <name> is <number>." sentences spread through the
  haystack; the question asks for one of them.

Prompts are raw completions (``... Question: ...\\nAnswer: The pass key is``): small models
answer them far more reliably than chat-templated ones at long lengths. Every task knows its
question span (``query_tokens``) so methods can use it as the text prior. Deterministic per
seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_DIR = Path("/usr/share/common-licenses")
_NAMES = ["amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper", "kestrel",
          "lotus", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "sierra", "tundra"]


@dataclass(frozen=True)
class TextTask:
    """One prompt with its expected answer.

    Attributes:
        task: ``"needle"`` or ``"multi_key"``. length: haystack tokens requested.
        depth: relative depth of the (asked) needle in [0, 1]. seed: generator seed.
        input_ids: (1, L) prompt ids. query_tokens: trailing question tokens.
        answer: the expected answer string (digits).
        tail_tokens: trailing prompt tokens fed after compression (0: all of the prompt is compressed).
    """

    task: str
    length: int
    depth: float
    seed: int
    input_ids: torch.Tensor
    query_tokens: int
    answer: str
    tail_tokens: int = 0

    @property
    def key(self) -> str:
        """Stable identifier (for result caching)."""
        return f"{self.task}-L{self.length}-d{self.depth:.2f}-s{self.seed}"

    @property
    def kind(self) -> str:
        """Task family (the evaluation table's ``kind`` column)."""
        return self.task

    def inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` for the model."""
        return {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids)}

    def is_correct(self, generated: str) -> bool:
        """See :func:`answer_correct`."""
        return answer_correct(generated, self.answer)


def corpus_text(directory: Path = TEXT_DIR) -> str:
    """All licence texts of ``directory`` concatenated, in name order."""
    files = sorted(p for p in directory.glob("*") if p.is_file()) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no text found under {directory}: install Debian's base-files package (it ships the licence texts) "
            "or pass another directory of plain-text files."
        )
    return "\n\n".join(p.read_text(errors="replace") for p in files)


class TextTaskBuilder:
    """Builds tasks for one tokenizer from the corpus (tokenised once).

    Args:
        tokenizer: a transformers tokenizer of the model under test.
        directory: folder of plain-text files for the haystack.
    """

    def __init__(self, tokenizer, directory: Path = TEXT_DIR) -> None:
        self.tokenizer = tokenizer
        self.haystack = self._encode(corpus_text(directory))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _haystack(self, length: int, rng: random.Random) -> list[int]:
        if length > len(self.haystack):
            raise ValueError(f"length {length} exceeds the corpus ({len(self.haystack)} tokens).")
        start = rng.randrange(0, len(self.haystack) - length + 1)
        return self.haystack[start : start + length]

    def _assemble(self, hay: list[int], inserts: list[tuple[float, str]], question: str) -> tuple[list[int], int]:
        """Insert sentences at relative depths (at sentence-like boundaries) and append the question."""
        hay = list(hay)
        for depth, sentence in sorted(inserts, reverse=True):  # deepest first keeps earlier offsets valid
            at = int(depth * len(hay))
            hay[at:at] = self._encode(f"\n{sentence}\n")
        head = self._encode("Read the document and answer the question at the end.\n\n")
        tail = self._encode(question)
        return head + hay + tail, len(tail)

    def needle(self, length: int, depth: float, seed: int) -> TextTask:
        """A pass-key retrieval prompt of about ``length`` tokens with the key at ``depth``."""
        rng = random.Random(f"needle-{length}-{depth}-{seed}")
        key = str(rng.randrange(10000, 100000))
        ids, query = self._assemble(
            self._haystack(length, rng),
            [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
            "\n\nQuestion: What is the pass key?\nAnswer: The pass key is",
        )
        return TextTask("needle", length, depth, seed, torch.tensor([ids]), query, key)

    def multi_key(self, length: int, depth: float, seed: int, keys: int = 4) -> TextTask:
        """``keys`` name/code sentences spread over the haystack; the one at ``depth`` is asked."""
        rng = random.Random(f"multi-{length}-{depth}-{seed}-{keys}")
        names = rng.sample(_NAMES, keys)
        codes = [str(rng.randrange(10000, 100000)) for _ in names]
        depths = [depth] + [rng.uniform(0.05, 0.95) for _ in names[1:]]
        ids, query = self._assemble(
            self._haystack(length, rng),
            [(d, f"The code for {n} is {c}.") for d, n, c in zip(depths, names, codes)],
            f"\n\nQuestion: What is the code for {names[0]}?\nAnswer: The code for {names[0]} is",
        )
        return TextTask("multi_key", length, depth, seed, torch.tensor([ids]), query, codes[0])


def answer_correct(generated: str, answer: str) -> bool:
    """True when the first number in the generated text is the answer."""
    digits = "".join(ch if ch.isdigit() else " " for ch in generated).split()
    return bool(digits) and digits[0] == answer
