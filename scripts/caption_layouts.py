"""How well the frozen Qwen2.5-Coder decoder answers the visual needle when it reads a caption layout
exactly (each visual token *is* its caption word's embedding, no vision tower): the measurement
behind coder-vlm's caption layout (``hybridkv/models/coder_vlm.py``).

Layouts of a cell's first patch row: ``shape-colour`` (``a1 circle red``, the bundled one) and
``colour-shape`` (``a1 red circle``); the other patch rows are the filler in both.

    python scripts/caption_layouts.py [--prompts 12] [--images 8] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from hybridkv.data.visual_tasks import make_split
from hybridkv.models import coder_vlm
from hybridkv.models.pretrained import load_pretrained


def colour_first(words: list[str]) -> list[str]:
    """The bundled caption (256 words) with each cell's shape and colour slots swapped."""
    out = list(words)
    for start in range(0, 256, 4):  # 4 patch words per cell per patch row; slots 2 and 3 of a first row
        if out[start + 2] != coder_vlm.FILLER or out[start + 3] != coder_vlm.FILLER:
            shape, colour = out[start + 2], out[start + 3]
            out[start + 2], out[start + 3] = (" empty", coder_vlm.FILLER) if shape == " empty" else (colour, shape)
    return out


LAYOUTS = {"shape-colour": lambda words: words, "colour-shape": colour_first}


def answer(decoder, tokenizer, sample, layout) -> str:
    """The decoder's first answer word on ``sample`` with exact caption embeddings of ``layout``."""
    embed = decoder.get_input_embeddings()
    newline = coder_vlm.word_ids(tokenizer, [coder_vlm.NEWLINE])
    text = coder_vlm.prompt_text(coder_vlm.question_text(sample.question), [257] * len(sample.scenes))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    visual = torch.cat([torch.cat([coder_vlm.word_ids(tokenizer, LAYOUTS[layout](coder_vlm.patch_words(scene))), newline])
                        for scene in sample.scenes])
    with torch.inference_mode():
        embeds = embed(ids)[0].clone()
        embeds[ids[0] == tokenizer.convert_tokens_to_ids(coder_vlm.IMAGE_PAD)] = embed(visual)
        out = decoder.generate(inputs_embeds=embeds[None], attention_mask=torch.ones_like(ids), max_new_tokens=3,
                               do_sample=False)
    words = tokenizer.decode(out[0], skip_special_tokens=True).split()
    return words[0].lower().strip(".,") if words else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12, help="validation needles")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decoder, tokenizer = load_pretrained(coder_vlm.DECODER, torch.bfloat16)
    samples = make_split("validation", "needle", args.prompts, coder_vlm.TASK_CONFIG, num_images=args.images)
    for layout in LAYOUTS:
        right = sum(answer(decoder, tokenizer, s, layout) == s.answer for s in samples)
        print(f"{layout}: {right}/{len(samples)} needles at {args.images} images", flush=True)


if __name__ == "__main__":
    main()
