"""RULER's synthetic task families (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), built offline for one tokenizer.

Every prompt counts ``length`` tokens at most, the question included, and is a raw completion
(instruction, context, ``Question: ...``, ``Answer: <prefix>``) like :mod:`hybridkv.data.text_tasks`.
A task's references are scored as RULER's "string match all": the share of them found in the
output, case-insensitive.

* **niah_single**: one needle "One of the special magic numbers for <key> is: <7-digit number>."
  in real text; the question asks for the number of <key>.
* **niah_multikey**: the asked needle among 3 needles of other keys.
* **niah_multivalue**: 4 needles of one key with different numbers; all 4 are asked.
* **niah_multiquery**: 4 needles of 4 keys; all 4 keys are asked.
* **variable_tracking**: one chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops, 5 variables)
  whose statements are spread, in order, through repeated noise lines; the question asks for every
  variable holding the value.
* **common_words**: a numbered list where 10 words occur 30 times and the others 3 times (6 and
  1 below 4096 tokens, as RULER does); the question asks for the 10 most common.
* **frequent_words**: random 6-letter coded words with Zipf (alpha 2) counts, the top rank being
  the noise word ``....``; the question asks for the 3 most frequent coded words.

Needles sit at sentence boundaries, at depths drawn from 40 evenly spaced ones; keys are pairs of
words. Where this differs from RULER's reference generators: the essay haystack is the licence
corpus of :mod:`hybridkv.data.text_tasks` (read cyclically from a random sentence, so it repeats
beyond its ~300 kB) instead of Paul Graham's essays; keys and the common-words list come from the
corpus' distinct lower-case words of 4-10 letters (~1,700) instead of the ``wonderwords`` lists,
so common_words stops where that pool runs out (roughly 30k-40k tokens, by tokenizer); Zipf counts
are normalised over the vocabulary rather than by the zeta function; there are no in-context
examples (RULER prepends one to variable tracking and common words) and no chat template; the
instruction and question texts are our own wording. The needle and variable prompts have exactly
``length`` tokens; the word lists stop short of it by less than one step of their size (one coded
word, or the three entries of one more rare word).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import cycle, repeat
from pathlib import Path

import torch

from hybridkv.data.text_tasks import TEXT_DIR, corpus_text

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking", "common_words",
               "frequent_words")
MAX_NEW_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "niah_multiquery": 48,
                  "variable_tracking": 30, "common_words": 80, "frequent_words": 32}
"""Answer lengths: one 7-digit number; four of them; five variable names; ten words; three coded words
(RULER generates 128 / 30 / 120 / 50 tokens for chat answers; raw completions answer at once)."""
DEPTHS = tuple(i / 39 for i in range(40))
"""RULER's needle depths: 40 evenly spaced in [0, 1]."""
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
"""RULER's variable-tracking haystack line."""
NOISE_WORD = "...."
"""Frequent words: the top-ranked word, noise the question says to ignore."""


@dataclass(frozen=True)
class RulerTask:
    """One RULER prompt with its reference strings.

    Attributes:
        task: one of :data:`RULER_TASKS`. length: the requested prompt length (the prompt has at most
        this many tokens). seed: generator seed. input_ids: (1, L) prompt ids.
        query_tokens: tokens of the trailing question (with its answer prefix); 0 when the question is the
            tail (``question-after``: the compressed prefix holds no question).
        references: strings a correct answer contains (all of them).
        max_new_tokens: tokens to generate for the answer.
        depth: relative depth in the context of the first asked needle (0.0 for the word lists).
        tail_tokens: trailing prompt tokens fed after compression (0: all of it is compressed).
        protocol: ``"answer-after"`` (question-aware: the question is compressed with the context and
            is the methods' text prior; nothing is fed after) or ``"question-after"`` (question-agnostic,
            as kvpress evaluates: only the context is compressed, the question is fed after it).
    """

    task: str
    length: int
    seed: int
    input_ids: torch.Tensor
    query_tokens: int | None
    references: tuple[str, ...]
    max_new_tokens: int
    depth: float = 0.0
    tail_tokens: int = 0
    protocol: str = "answer-after"

    @property
    def key(self) -> str:
        """Stable identifier (for result caching); question-agnostic prompts end in ``-qafter``."""
        suffix = "-qafter" if self.protocol == "question-after" else ""
        return f"ruler-{self.task}-L{self.length}-s{self.seed}{suffix}"

    def question_after(self) -> RulerTask:
        """The question-agnostic variant: the question (with its answer prefix) is the tail fed after
        compression, and the compressed prefix holds no question (``query_tokens=0``: methods that
        need a query fall back to the prompt's last tokens, as kvpress's presses do without one)."""
        return replace(self, query_tokens=0, tail_tokens=self.query_tokens, protocol="question-after")

    @property
    def kind(self) -> str:
        """Task family (the evaluation table's ``kind`` column)."""
        return self.task

    @property
    def answer(self) -> str:
        """The references, for display."""
        return ", ".join(self.references)

    def inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` for the model."""
        return {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids)}

    def score(self, generated: str) -> float:
        """Share of the references found in ``generated``, case-insensitive (RULER's string match all)."""
        text = generated.lower()
        return sum(ref.lower() in text for ref in self.references) / len(self.references)

    def is_correct(self, generated: str) -> bool:
        """Every reference found."""
        return self.score(generated) == 1.0


class RulerBuilder:
    """Builds RULER prompts for one tokenizer; one method per task family, each ``(length, seed) -> RulerTask``.

    Args:
        tokenizer: a transformers tokenizer of the model under test.
        directory: folder of plain-text files for the haystack and the word pool.
    """

    def __init__(self, tokenizer, directory: Path = TEXT_DIR) -> None:
        self.tokenizer = tokenizer
        self.text = corpus_text(directory)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def sentences(self) -> list[list[int]]:
        """The corpus cut after every sentence end (each piece but the first opens with its whitespace), encoded."""
        pieces = (self._encode(piece) for piece in re.split(r"(?<=[.!?])(?=\s)", self.text))
        return [ids for ids in pieces if ids]

    @cached_property
    def words(self) -> list[str]:
        """The corpus' distinct lower-case alphabetic words of 4-10 letters, sorted."""
        return sorted(set(re.findall(r"\b[a-z]{4,10}\b", self.text.lower())))

    # --- needles in a haystack ---

    def niah_single(self, length: int, seed: int) -> RulerTask:
        """One needle; its number is asked."""
        return self._niah("niah_single", length, seed, keys=1, values=1, asked=1)

    def niah_multikey(self, length: int, seed: int) -> RulerTask:
        """Four needles of four keys; one key's number is asked."""
        return self._niah("niah_multikey", length, seed, keys=4, values=1, asked=1)

    def niah_multivalue(self, length: int, seed: int) -> RulerTask:
        """Four needles of one key; its four numbers are asked."""
        return self._niah("niah_multivalue", length, seed, keys=1, values=4, asked=1)

    def niah_multiquery(self, length: int, seed: int) -> RulerTask:
        """Four needles of four keys; all four numbers are asked."""
        return self._niah("niah_multiquery", length, seed, keys=4, values=1, asked=4)

    def _niah(self, task: str, length: int, seed: int, keys: int, values: int, asked: int) -> RulerTask:
        """``keys`` keys with ``values`` numbers each, one needle per number; ``asked`` keys' numbers are the references."""
        rng = _rng(task, length, seed)
        names = _distinct(lambda: f"{rng.choice(self.words)}-{rng.choice(self.words)}", keys)
        numbers = [str(n) for n in rng.sample(range(10**6, 10**7), keys * values)]
        needles = [(names[i // values], number) for i, number in enumerate(numbers)]
        rng.shuffle(needles)
        queried = rng.sample(names, asked)
        references = tuple(number for name in queried for number in numbers if (name, number) in needles)
        phrase = queried[0] if asked == 1 else ", ".join(queried[:-1]) + f", and {queried[-1]}"
        if len(references) == 1:
            question = (f"\n\nQuestion: Which special magic number for {phrase} is mentioned in the text above?\n"
                        f"Answer: The special magic number for {phrase} mentioned in the text above is")
        else:
            question = (f"\n\nQuestion: Which special magic numbers for {phrase} are mentioned in the text above?\n"
                        f"Answer: The special magic numbers for {phrase} mentioned in the text above are")
        head = "The text below hides some special magic numbers. Remember them: you will be asked about them at the end.\n\n"
        inserts = [self._encode(f" One of the special magic numbers for {name} is: {number}.") for name, number in needles]
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        start = rng.randrange(len(self.sentences))
        sentences = cycle(self.sentences[start:] + self.sentences[:start])

        def slots(pieces: int) -> list[int]:
            return [min(int(d * pieces), pieces - 1) for d in depths]

        first = min(i for i, (name, _) in enumerate(needles) if name in queried)
        return self._woven(task, length, seed, head, question, sentences, inserts, slots, first, references)

    # --- multi-hop tracing ---

    def variable_tracking(self, length: int, seed: int, hops: int = 4) -> RulerTask:
        """One chain of ``hops`` assignments from a 5-digit value; every variable of the chain is asked."""
        rng = _rng("variable_tracking", length, seed)
        names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), hops + 1)
        value = str(rng.randrange(10000, 100000))
        statements = [f"VAR {names[0]} = {value}\n"] + [f"VAR {b} = VAR {a}\n" for a, b in zip(names, names[1:])]
        head = "Follow the chain of variable assignments hidden in the text below.\n\n"
        question = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above.\n"
                    f"Answer: Tracing the assignments in the text above, the {len(names)} variables that hold the value "
                    f"{value} are:")

        def slots(pieces: int) -> list[int]:
            return sorted(rng.randrange(pieces) for _ in statements)

        return self._woven("variable_tracking", length, seed, head, question, repeat(self._encode(NOISE)),
                           [self._encode(s) for s in statements], slots, 0, tuple(names))

    def _woven(self, task: str, length: int, seed: int, head: str, question: str, filler: Iterator[list[int]],
               inserts: list[list[int]], slots: Callable[[int], list[int]], first: int,
               references: tuple[str, ...]) -> RulerTask:
        """Filler pieces up to exactly ``length`` tokens, ``inserts[i]`` placed before piece ``slots(n)[i]``.

        ``first`` names the insert whose relative depth in the context is the task's ``depth``.
        """
        head_ids, question_ids = self._encode(head), self._encode(question)
        budget = length - len(head_ids) - len(question_ids) - sum(map(len, inserts))
        if budget < 1:
            raise ValueError(f"{task}: {length} tokens cannot hold the instruction, question and inserts.")
        pieces = []
        while budget > 0:
            pieces.append(next(filler)[:budget])
            budget -= len(pieces[-1])
        before: dict[int, list[int]] = {}
        for i, slot in enumerate(slots(len(pieces))):
            before.setdefault(slot, []).append(i)
        body, offset = [], 0
        for slot, piece in enumerate(pieces):
            for i in before.get(slot, []):
                if i == first:
                    offset = len(body)
                body += inserts[i]
            body += piece
        ids = head_ids + body + question_ids
        return RulerTask(task, length, seed, torch.tensor([ids]), len(question_ids), references, MAX_NEW_TOKENS[task],
                         round(offset / len(body), 3))

    # --- aggregation ---

    def common_words(self, length: int, seed: int, common: int = 10) -> RulerTask:
        """A numbered word list: ``common`` words 30 times each (6 below 4096 tokens), as many others
        as fit 3 times each (once below 4096 tokens); the ``common`` words are asked."""
        rng = _rng("common_words", length, seed)
        repeats, rare_repeats = (30, 3) if length >= 4096 else (6, 1)
        words = rng.sample(self.words, len(self.words))
        head = ("Below is a numbered list of words. Some of them occur more often than the others: remember which ones "
                "occur most often.\n\n")
        question = (f"\n\nQuestion: Which {common} words occur most often in the list above?\n"
                    f"Answer: The {common} words that occur most often in the list above are:")

        def listed(rare: int) -> str:
            entries = words[:common] * repeats + words[common : common + rare] * rare_repeats
            random.Random(f"ruler-common_words-{length}-{seed}-{rare}").shuffle(entries)
            return " ".join(f"{i}. {word}" for i, word in enumerate(entries, 1))

        most = len(words) - common
        rare = self._largest("common_words", length, head, question, listed, most)
        if rare == most:
            raise ValueError(f"common_words: {length} tokens need more than the corpus' {len(self.words)} distinct words.")
        return self._listed("common_words", length, seed, head, question, listed(rare), tuple(words[:common]))

    def frequent_words(self, length: int, seed: int, alpha: float = 2.0, top: int = 3) -> RulerTask:
        """Coded words (6 random letters) with Zipf counts over ``length // 50`` ranks, rank 1 the noise
        word :data:`NOISE_WORD`; ranks 2 to ``top + 1`` are asked."""
        rng = _rng("frequent_words", length, seed)
        vocab = [NOISE_WORD, *_distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), max(length // 50, top + 2))]
        weights = [rank**-alpha for rank in range(1, len(vocab) + 1)]
        share = [w / sum(weights) for w in weights]
        head = (f"Read the coded text below and count how often each coded word occurs. The dots '{NOISE_WORD}' are "
                "noise, not a word.\n\n")
        question = (f"\n\nQuestion: Ignoring the dots '{NOISE_WORD}', which {top} coded words occur most often in the text "
                    f"above? Give no explanation.\nAnswer: The {top} coded words that occur most often in the text above are:")

        def listed(n: int) -> str:
            entries = [word for word, p in zip(vocab, share) for _ in range(int(n * p))]
            random.Random(f"ruler-frequent_words-{length}-{seed}-{n}").shuffle(entries)
            return " ".join(entries)

        n = self._largest("frequent_words", length, head, question, listed, 2 * length)
        if int(n * share[top]) <= int(n * share[top + 1]):
            raise ValueError(f"frequent_words: {length} tokens are too few to rank the top {top} words apart.")
        return self._listed("frequent_words", length, seed, head, question, listed(n), tuple(vocab[1 : top + 1]))

    def _largest(self, task: str, length: int, head: str, question: str, listed: Callable[[int], str], most: int) -> int:
        """The largest ``n`` in [0, most] whose prompt ``head + listed(n) + question`` fits ``length`` (binary search)."""
        budget = length - len(self._encode(head)) - len(self._encode(question))
        if len(self._encode(listed(0))) > budget:
            raise ValueError(f"{task}: {length} tokens cannot hold the instruction, question and list.")
        low, high = 0, most
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if len(self._encode(listed(mid))) <= budget else (low, mid - 1)
        return low

    def _listed(self, task: str, length: int, seed: int, head: str, question: str, context: str,
                references: tuple[str, ...]) -> RulerTask:
        question_ids = self._encode(question)
        ids = self._encode(head) + self._encode(context) + question_ids
        return RulerTask(task, length, seed, torch.tensor([ids]), len(question_ids), references, MAX_NEW_TOKENS[task])


PROTOCOLS = ("answer-after", "question-after")
"""Question-aware (nothing fed after compression) and question-agnostic (the question fed after)."""


def ruler_tasks(tokenizer, tasks: list[str], lengths: list[int], seeds: list[int],
                protocol: str = "answer-after") -> list[RulerTask]:
    """Every (task, length, seed) of :data:`RULER_TASKS` names, in that order, under ``protocol``."""
    unknown = sorted(set(tasks) - set(RULER_TASKS))
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; known: {', '.join(RULER_TASKS)}.")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}.")
    builder = RulerBuilder(tokenizer)
    built = [getattr(builder, task)(length, seed) for task in tasks for length in lengths for seed in seeds]
    return [t.question_after() for t in built] if protocol == "question-after" else built


def _rng(task: str, length: int, seed: int) -> random.Random:
    return random.Random(f"ruler-{task}-{length}-{seed}")


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    """``count`` different strings from ``draw``, in the order first drawn."""
    found: dict[str, None] = {}
    while len(found) < count:
        found[draw()] = None
    return list(found)
