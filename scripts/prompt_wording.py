"""How surely coder-vlm's full cache reads the visual needle under other wordings of the text after
the images: the measurement behind coder-vlm's prompt (:func:`hybridkv.models.coder_vlm.prompt_text`),
which says no note before the question.

Each validation needle's system turn and images are prefilled once; every wording's text (the note
before the question, the question, the chat tail) is fed on its own copy of that cache. Per wording:
the needles whose greedy first word is the star's colour, and the margin of the answer's log-probability
over the best other colour (mean and least), in bfloat16.

    python scripts/prompt_wording.py [--prompts 16] [--images 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy

import torch

from hybridkv.data.visual_tasks import COLOURS, make_split
from hybridkv.models import coder_vlm

BOARD = "Each image is a board of 4x4 cells named a1 to d4."
LAYOUT = f"{BOARD[:-1]}; each cell is written as its name, its shape and its colour."
UNIQUE = "Exactly one cell of one image holds a star."
NOTES = {
    "bundled": "",
    "board": BOARD,
    "+layout": LAYOUT,
    "+unique": f"{BOARD} {UNIQUE}",
    "+layout+unique": f"{LAYOUT} {UNIQUE}",
}
"""The note said before the question, per wording (``bundled``: the model's own prompt, no note;
``board``: the note it said until 2026-12-07)."""


def readings(model, tokenizer, processor, sample) -> dict[str, tuple[str, float]]:
    """Per wording: the greedy first answer word and the answer colour's log-probability margin."""
    built = {name: coder_vlm.build_inputs(tokenizer, processor, sample.images(), sample.question, model.config, note)
             for name, note in NOTES.items()}
    inputs, ids = built["bundled"], {name: b["input_ids"] for name, b in built.items()}
    images_end = int((inputs["input_ids"][0] == model.config.image_token_index).nonzero().max()) + 1
    colour_ids = {c: tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in COLOURS}
    out = {}
    with torch.inference_mode():
        prefix = model(input_ids=inputs["input_ids"][:, :images_end], pixel_values=inputs["pixel_values"],
                       image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"], use_cache=True)
        for name, full in ids.items():
            if not torch.equal(full[:, :images_end], inputs["input_ids"][:, :images_end]):
                raise RuntimeError(f"wording {name!r} changes the tokens before the text")
            logits = model(input_ids=full[:, images_end:], past_key_values=copy.deepcopy(prefix.past_key_values),
                           attention_mask=torch.ones_like(full), use_cache=True).logits[0, -1]
            logp = logits.float().log_softmax(-1)
            word = tokenizer.decode(int(logp.argmax())).strip().lower()
            margin = float(logp[colour_ids[sample.answer]] - max(logp[i] for c, i in colour_ids.items() if c != sample.answer))
            out[name] = (word, margin)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="validation needles")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, processor = coder_vlm.load_coder_vlm(torch.bfloat16)
    samples = make_split("validation", "needle", args.prompts, coder_vlm.TASK_CONFIG, num_images=args.images)
    rows = []
    for i, sample in enumerate(samples, 1):
        rows.append((sample.answer, readings(model, tokenizer, processor, sample)))
        print(f"{i}/{len(samples)} seed {sample.seed}: " + ", ".join(f"{n} {w} ({m:+.2f})" for n, (w, m) in rows[-1][1].items()),
              flush=True)
    for name in NOTES:
        right = sum(r[name][0] == answer for answer, r in rows)
        margins = [r[name][1] for _, r in rows]
        mean = sum(margins) / len(margins)
        print(f"{name}: {right}/{len(rows)} needles at {args.images} images; colour margin mean {mean:.2f}, "
              f"least {min(margins):.2f} nats", flush=True)


if __name__ == "__main__":
    main()
