#!/usr/bin/env python
"""Train the bundled tiny Qwen2.5-VL model from scratch on the procedural visual tasks (CPU).

    python scripts/train_tiny_vlm.py                  # writes hybridkv/assets/tiny_vlm/
    python scripts/train_tiny_vlm.py --steps 200 --out /tmp/tiny_vlm   # quick smoke run

Recipe (each choice below fixed a failure seen in shorter runs on this CPU):

- Tasks from :mod:`hybridkv.data.visual_tasks`: single-image batches mix ``cell_colour``,
  ``cell_shape`` and ``count``; a quarter of the steps are ``needle`` batches (one haystack
  size per batch, the batch shrinking so that it holds about ``2 * batch_size`` images).
- Loss: cross-entropy on the answer tokens only (the answer word and ``<|im_end|>``), plus
  three auxiliary terms that only shape training (the saved model is a plain Qwen2.5-VL):

  * ``attn_weight`` x question attention: at decoder layer ``question_layer`` the last
    prompt position's attention, averaged over query heads, should fall on the question's
    content words (``-log`` of that mass);
  * ``attn_weight`` x region attention: at layer ``region_layer`` it should fall on the
    visual tokens of the cell that holds the answer (``count`` samples have none);
  * ``probe_weight`` x cell probe (:class:`CellProbe`): linear heads read every cell's
    colour and shape from the vision tower's output tokens.

  Without the attention terms the two hops of a cell question (carry the row and column
  words to the last position, then look the cell up) only start to learn together and
  the model sat at chance for thousands of steps; without the probe, shape features got
  almost no gradient through the language model and shape answers stayed at chance.
- Curriculum over the fraction of steps done (``CURRICULUM``): first single-item boards
  (learn colours and shapes), then few items (learn to locate), then the full range.
- AdamW, linear warm-up then cosine decay to 10 %, gradient clipping at 1, bf16 autocast
  on CPU with fp32 master weights. Everything is seeded: the same ``--seed``,
  ``--steps`` and ``--threads`` reproduce the same weights on the same machine. One
  thread is the default: two threads on a shared two-core machine were 4x slower.

At the end the model is saved in fp16 (with tokenizer, image processor and checksums),
reloaded in fp32 through :func:`hybridkv.models.tiny_vlm.load_tiny_vlm`, and evaluated on
the test split with plain greedy ``model.generate``; a counterfactual check repaints the
named cell (the answer must follow) or every other cell (the answer must not change).
Everything goes to ``training_report.json`` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    apply_multimodal_rotary_pos_emb,
)
from transformers.utils import logging as hf_logging

from hybridkv.data.visual_tasks import (
    COLOURS,
    NEEDLE_SHAPE,
    SHAPES,
    SINGLE_IMAGE_TASKS,
    SPLITS,
    Sample,
    TaskConfig,
    make_sample,
    split_seeds,
)
from hybridkv.models.tiny_vlm import (
    ASSET_DIR,
    TinyVLMSize,
    build_image_processor,
    build_inputs,
    build_tiny_vlm,
    build_tokenizer,
    load_tiny_vlm,
    save_tiny_vlm,
    write_checksums,
)

MERGED_PATCH = 28
"""Pixels per side of one visual token (14 px patches, 2x2 merge)."""


@dataclass(frozen=True)
class Phase:
    """One stage of the curriculum, active until ``until`` (a fraction of all steps).

    Attributes:
        until: end of the phase as a fraction of the training steps.
        min_items: fewest shapes per board.
        max_items: most shapes per board.
        max_images: most images of a needle sample (at least 1).
    """

    until: float
    min_items: int
    max_items: int
    max_images: int


CURRICULUM: tuple[Phase, ...] = (
    Phase(0.08, 1, 1, 2),
    Phase(0.30, 2, 4, 4),
    Phase(1.00, 1, 7, 8),
)
SINGLE_TASK_WEIGHTS: dict[str, float] = {
    "cell_colour": 0.4,
    "cell_shape": 0.4,
    "count": 0.2,
}
NEEDLE_SHARE = 0.25
"""Fraction of steps that train on needle (multi-image) batches."""


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSET_DIR, help="asset directory to write")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=16, help="single-image samples per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--attn-weight",
        type=float,
        default=0.5,
        help="weight of each attention-supervision loss",
    )
    p.add_argument(
        "--probe-weight",
        type=float,
        default=0.5,
        help="weight of the vision-tower cell-probe loss",
    )
    p.add_argument(
        "--question-layer",
        type=int,
        default=1,
        help="layer whose last position should read the key words",
    )
    p.add_argument(
        "--region-layer",
        type=int,
        default=2,
        help="layer whose last position should read the answer cell",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (more only on an idle machine)",
    )
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--test-size", type=int, default=250, help="test samples per single-image task")
    p.add_argument(
        "--needle-test-size",
        type=int,
        default=100,
        help="test samples per haystack size",
    )
    return p.parse_args()


def phase_at(step: int, steps: int) -> Phase:
    """The curriculum phase of ``step`` out of ``steps``."""
    return next(ph for ph in CURRICULUM if step < ph.until * steps or ph is CURRICULUM[-1])


def training_batches(args: argparse.Namespace, config: TaskConfig) -> Iterator[list[Sample]]:
    """Deterministic stream of training batches (lists of samples sharing a haystack size)."""
    rng = random.Random(args.seed)
    seeds = iter(SPLITS["train"])
    tasks, weights = list(SINGLE_TASK_WEIGHTS), list(SINGLE_TASK_WEIGHTS.values())
    for step in range(args.steps):
        phase = phase_at(step, args.steps)
        cfg = replace(config, min_items=phase.min_items, max_items=phase.max_items)
        if rng.random() < NEEDLE_SHARE:
            n = rng.randint(1, phase.max_images)
            size = max(1, 2 * args.batch_size // n)
            yield [make_sample("needle", next(seeds), cfg, num_images=n) for _ in range(size)]
        else:
            yield [make_sample(rng.choices(tasks, weights)[0], next(seeds), cfg) for _ in range(args.batch_size)]


TEMPLATE_WORDS = frozenset({"what", "is", "the", "in", "row", "column", "how", "many", "are", "there", "?"})
"""Question words that carry no information about the answer."""


def key_word_positions(sample: Sample, input_ids: torch.Tensor, tokenizer) -> list[int]:
    """Prompt positions of the question's content words (all words but ``TEMPLATE_WORDS``).

    These name what is asked (colour or shape) and where (row number and column letter,
    the colour to count, the needle's shape). Positions index ``input_ids`` (L,); the
    question is the last occurrence of its words.
    """
    ids = input_ids.tolist()
    positions = []
    for word in sample.question.split():
        if word not in TEMPLATE_WORDS:
            token = tokenizer.convert_tokens_to_ids(word)
            positions.append(len(ids) - 1 - ids[::-1].index(token))
    return positions


def target_positions(sample: Sample, input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Prompt positions of the visual tokens covering ``sample.target``'s cell (empty if None).

    Args:
        sample: the sample whose prompt is ``input_ids``.
        input_ids: (L,) token ids of that prompt (any padding included).
        image_token_id: id of ``<|image_pad|>``.
    """
    if sample.target is None:
        return []
    image_index, row, col = sample.target
    scene = sample.scenes[image_index]
    side = scene.image_size // MERGED_PATCH
    per_cell = side // scene.grid
    if per_cell * scene.grid * MERGED_PATCH != scene.image_size:
        raise ValueError(f"cells of a {scene.image_size} px, {scene.grid}x{scene.grid} board are not token-aligned")
    positions = (input_ids == image_token_id).nonzero().squeeze(1)
    first = image_index * side * side
    return [
        int(positions[first + (row * per_cell + dr) * side + col * per_cell + dc])
        for dr in range(per_cell)
        for dc in range(per_cell)
    ]


class CellProbe(torch.nn.Module):
    """Training-only linear heads that read each cell's colour and shape from the vision tower's tokens.

    Boards are token-aligned: every cell is a square of merged visual tokens. The heads
    classify, from the mean of a cell's ``out_hidden_size`` token features, the colour
    and the shape of the cell's item (or empty). This dense signal teaches the vision
    tower colours and shapes within a few hundred steps; through the language model
    alone, shape features barely receive gradient and stay at chance for thousands of
    steps. The heads are discarded after training: the saved model is a plain Qwen2.5-VL.
    """

    EMPTY = "empty"

    def __init__(self, visual: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.colours = sorted(COLOURS) + [self.EMPTY]
        self.shapes = list(SHAPES) + [NEEDLE_SHAPE, self.EMPTY]
        self.colour_head = torch.nn.Linear(hidden_size, len(self.colours))
        self.shape_head = torch.nn.Linear(hidden_size, len(self.shapes))
        self.features: torch.Tensor | None = None
        self.handle = visual.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple, output) -> None:
        self.features = output.pooler_output

    def loss(self, samples: list[Sample]) -> torch.Tensor:
        """Cross-entropy of both heads on the cells of every image of the last vision-tower call.

        Args:
            samples: the batch whose images (in ``pixel_values`` order) produced the features (T, D).
        """
        pooled, colours, shapes = [], [], []
        start = 0
        for scene in (scene for sample in samples for scene in sample.scenes):
            side = scene.image_size // MERGED_PATCH
            per_cell = side // scene.grid
            tokens = self.features[start : start + side * side].float().view(side, side, -1)
            start += side * side
            cells = tokens.view(scene.grid, per_cell, scene.grid, per_cell, -1).mean((1, 3)).flatten(0, 1)
            pooled.append(cells)
            for row in range(scene.grid):
                for col in range(scene.grid):
                    item = scene.item_at(row, col)
                    colours.append(self.colours.index(item.colour if item else self.EMPTY))
                    shapes.append(self.shapes.index(item.shape if item else self.EMPTY))
        features = torch.cat(pooled)
        return torch.nn.functional.cross_entropy(
            self.colour_head(features), torch.tensor(colours)
        ) + torch.nn.functional.cross_entropy(self.shape_head(features), torch.tensor(shapes))


class FinalTokenAttention:
    """Records, in training mode, one decoder layer's attention of the last prompt position.

    After a forward pass, ``probs`` is a float32 tensor (B, H, L): the softmax attention of
    position L-1 of every row over all positions (padding masked), per query head, computed
    from the same q/k projections and M-RoPE rotation as the layer itself uses.
    """

    def __init__(self, attention: torch.nn.Module) -> None:
        self.attention = attention
        self.attention_mask: torch.Tensor | None = None
        self.probs: torch.Tensor | None = None
        self.handle = attention.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        hidden = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        batch, length, _ = hidden.shape
        head_dim = module.head_dim
        section = module.config.rope_parameters["mrope_section"]
        q = module.q_proj(hidden[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
        k = module.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
        q, _ = apply_multimodal_rotary_pos_emb(q, q, cos[..., -1:, :], sin[..., -1:, :], section)
        _, k = apply_multimodal_rotary_pos_emb(k, k, cos, sin, section)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)).squeeze(2).float() * module.scaling
        scores = scores.masked_fill(self.attention_mask[:, None, :] == 0, float("-inf"))
        self.probs = scores.softmax(-1)


def attention_loss(probs: torch.Tensor, targets: list[list[int]]) -> torch.Tensor | None:
    """Mean over rows with a target of ``-log`` (head-averaged attention mass on the target positions).

    Args:
        probs: (B, H, L) attention of the last position.
        targets: per row, the target positions (empty: row skipped).
    """
    mask = torch.zeros(probs.shape[0], probs.shape[2], dtype=torch.bool)
    for row, positions in enumerate(targets):
        mask[row, positions] = True
    rows = mask.any(-1)
    if not rows.any():
        return None
    mass = (probs * mask[:, None, :]).sum(-1).mean(1)
    return -(mass[rows] + 1e-6).log().mean()


@torch.no_grad()
def first_token_accuracy(model, tokenizer, processor, samples: list[Sample], batch_size: int = 32) -> float:
    """Share of samples whose greedy first answer token is the answer (fast validation)."""
    model.eval()
    correct = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        inputs = build_inputs(
            tokenizer,
            processor,
            [s.images() for s in chunk],
            [s.question for s in chunk],
        )
        predicted = tokenizer.convert_ids_to_tokens(model(**inputs).logits[:, -1].argmax(-1).tolist())
        correct += sum(p == s.answer for p, s in zip(predicted, chunk))
    return correct / len(samples)


@torch.no_grad()
def generate_answers(model, tokenizer, processor, samples: list[Sample], batch_size: int = 32) -> list[str]:
    """Greedy ``model.generate`` answers (left-padded batches, special tokens stripped)."""
    answers = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        inputs = build_inputs(
            tokenizer,
            processor,
            [s.images() for s in chunk],
            [s.question for s in chunk],
        )
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return answers


def recoloured(sample: Sample, target_only: bool) -> tuple[Sample, str]:
    """A copy of a single-image ``cell_colour`` sample with repainted shapes, and its new answer.

    ``target_only``: repaint the named cell's shape with the next colour (the answer changes);
    otherwise repaint every other shape (the answer stays).
    """
    names = sorted(COLOURS)
    (scene,) = sample.scenes
    _, row, col = sample.target
    items = []
    for item in scene.items:
        if ((item.row, item.col) == (row, col)) == target_only:
            colour = names[(names.index(item.colour) + 1) % len(names)]
            item = replace(item, colour=colour, rgb=COLOURS[colour])
        items.append(item)
    new_scene = replace(scene, items=tuple(items))
    answer = new_scene.item_at(row, col).colour
    return replace(sample, scenes=(new_scene,), answer=answer), answer


def test_report(model, tokenizer, processor, args: argparse.Namespace, config: TaskConfig) -> dict[str, object]:
    """Test-split accuracies with plain greedy generate, per task and haystack size, plus the counterfactual check."""
    report: dict[str, object] = {}
    for task in SINGLE_IMAGE_TASKS:
        samples = [make_sample(task, seed, config) for seed in split_seeds("test", args.test_size)]
        answers = generate_answers(model, tokenizer, processor, samples)
        report[task] = sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)
    report["cell"] = (report["cell_colour"] + report["cell_shape"]) / 2
    for n in (4, 8, 16, 32, 64):
        count = args.needle_test_size if n <= 16 else max(1, args.needle_test_size // 4)
        samples = [make_sample("needle", seed, config, num_images=n) for seed in split_seeds("test", count)]
        answers = generate_answers(model, tokenizer, processor, samples, batch_size=max(1, 64 // n))
        report[f"needle_{n}_images"] = sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)
    base = [make_sample("cell_colour", seed, config) for seed in split_seeds("test", args.test_size)]
    for name, target_only in (
        ("counterfactual_target_repainted", True),
        ("counterfactual_others_repainted", False),
    ):
        changed = [recoloured(s, target_only)[0] for s in base]
        answers = generate_answers(model, tokenizer, processor, changed)
        report[name] = sum(a == s.answer for a, s in zip(answers, changed)) / len(changed)
    return report


def main() -> None:
    """Train, save, reload, test and write the report."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    config = TaskConfig()
    tokenizer, processor = build_tokenizer(), build_image_processor()
    size = TinyVLMSize()
    model = build_tiny_vlm(tokenizer, size, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny VLM: {n_params / 1e6:.2f}M parameters, {args.steps} steps, {args.threads} threads",
        flush=True,
    )
    image_token_id = model.config.image_token_id
    layers = model.model.language_model.layers
    question_probe = FinalTokenAttention(layers[args.question_layer].self_attn)
    region_probe = FinalTokenAttention(layers[args.region_layer].self_attn)
    cell_probe = CellProbe(model.model.visual, size.hidden_size)
    parameters = list(model.parameters()) + list(cell_probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    validation = {
        task: [make_sample(task, seed, config) for seed in split_seeds("validation", 64)] for task in SINGLE_IMAGE_TASKS
    }
    validation["needle_4_images"] = [
        make_sample("needle", seed, config, num_images=4) for seed in split_seeds("validation", 32)
    ]
    log: list[dict[str, float]] = []
    started = time.time()
    running: dict[str, float] = {}
    model.train()
    for step, samples in enumerate(training_batches(args, config)):
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        scale = (step + 1) / args.warmup if step < args.warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        batch = build_inputs(
            tokenizer,
            processor,
            [s.images() for s in samples],
            [s.question for s in samples],
            [s.answer for s in samples],
        )
        question_probe.attention_mask = region_probe.attention_mask = batch["attention_mask"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            losses = {
                "answer_loss": model(**batch).loss,
                "cell_probe_loss": cell_probe.loss(samples),
            }
            rows = list(zip(samples, batch["input_ids"]))
            question_targets = [key_word_positions(s, ids, tokenizer) for s, ids in rows]
            region_targets = [target_positions(s, ids, image_token_id) for s, ids in rows]
            losses["question_attn_loss"] = attention_loss(question_probe.probs, question_targets)
            losses["region_attn_loss"] = attention_loss(region_probe.probs, region_targets)
            loss = losses["answer_loss"] + args.probe_weight * losses["cell_probe_loss"]
            loss = loss + args.attn_weight * sum(v for k, v in losses.items() if "attn" in k and v is not None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for key, value in losses.items():
            if value is not None:
                running[key] = value.item() if key not in running else 0.98 * running[key] + 0.02 * value.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            entry = {
                "step": step + 1,
                "minutes": (time.time() - started) / 60,
                **running,
            }
            entry.update(
                {f"val_{k}": first_token_accuracy(model, tokenizer, processor, v) for k, v in validation.items()}
            )
            model.train()
            log.append(entry)
            print(
                " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()),
                flush=True,
            )
    train_minutes = (time.time() - started) / 60
    for hook_owner in (question_probe, region_probe, cell_probe):
        hook_owner.handle.remove()
    model.eval()
    save_tiny_vlm(model, tokenizer, processor, args.out)
    reloaded, tokenizer, processor = load_tiny_vlm(args.out)
    test = test_report(reloaded, tokenizer, processor, args, config)
    print("test:", json.dumps(test, indent=1), flush=True)
    weights = args.out / "model.safetensors"
    report = {
        "train_minutes": train_minutes,
        "parameters": n_params,
        "weights_bytes": weights.stat().st_size,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "size": asdict(size),
        "task_config": asdict(config),
        "curriculum": [asdict(ph) for ph in CURRICULUM],
        "validation_log": log,
        "test": test,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_checksums(args.out)


if __name__ == "__main__":
    main()
