"""Where coder-vlm's vision path misreads a board, beside the full cache's answers.

Boards: every board of the visual needle's prompts in ``--split`` (``--images`` x ``--per-kind``,
the seeds ``benchmarks/multimodal.py`` runs) goes through the vision path as the model runs it
(bfloat16). Per visual token: is its nearest caption-vocabulary embedding its target word, and how
far is it from the target (L2, relative to the target's norm)? Printed: the misread tokens
(target -> read), the share of tokens more than 5% away, and per prompt whether a misreading
involves the star (the star read as another shape, or another shape read as a star). With
``--results`` (a ``benchmarks/multimodal.py`` JSONL), the full cache's answer beside each prompt.

    python scripts/vision_errors.py [--split test] [--images 8 16 32] [--per-kind 16] [--results R.jsonl]
                                    [--weights DIR]  (a vision path written by scripts/train_coder_vlm.py --out DIR)
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from hybridkv.data.visual_tasks import NEEDLE_SHAPE, make_split
from hybridkv.models import coder_vlm

FAR = 0.05
"""Relative distance above which a token counts as far from its target."""


def read_boards(model, processor, scenes) -> torch.Tensor:
    """(boards, 256, hidden) visual tokens of ``scenes`` as the model computes them (its dtype)."""
    pixels = processor(images=[s.render() for s in scenes], return_tensors="pt")["pixel_values"][:, 0]
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    with torch.inference_mode():
        hidden = tower(pixels.to(model.dtype), output_hidden_states=True).hidden_states[-1]
        return projector(hidden)


def targets_of(scenes, tokenizer) -> torch.Tensor:
    """(boards, 256) caption token ids."""
    return torch.stack([coder_vlm.patch_targets(s, tokenizer) for s in scenes])


def board_errors(model, tokenizer, processor, samples, results: dict | None) -> None:
    """Print the misread tokens, the far share, and per prompt the star confusions."""
    table = model.get_input_embeddings().weight.float()
    all_targets = [targets_of(s.scenes, tokenizer) for s in samples]
    vocab = torch.unique(torch.cat([t.flatten() for t in all_targets]))
    star = coder_vlm.word_ids(tokenizer, [f" {NEEDLE_SHAPE}"])[0]
    misread, far, tokens, boards, wrong_boards, star_prompts = Counter(), 0, 0, 0, 0, 0
    for sample, target in zip(samples, all_targets):
        out = read_boards(model, processor, sample.scenes).float()
        nearest = vocab[torch.cdist(out.reshape(-1, out.shape[-1]), table[vocab]).argmin(-1)].view(target.shape)
        distance = (out - table[target]).norm(dim=-1) / table[target].norm(dim=-1)
        wrong = (nearest != target).nonzero().tolist()
        pairs = [(tokenizer.decode(int(target[b, j])), tokenizer.decode(int(nearest[b, j]))) for b, j in wrong]
        misread.update(pairs)
        far += int((distance > FAR).sum())
        tokens += target.numel()
        boards += len(sample.scenes)
        wrong_boards += len({b for b, _ in wrong})
        star_confused = any(int(target[b, j]) == star or int(nearest[b, j]) == star for b, j in wrong)
        star_prompts += star_confused
        key = f"needle-s{sample.seed}-n{len(sample.scenes)}"
        full = (results or {}).get(key)
        answer = f"; full cache {full['output']!r} for {sample.answer!r}" if full else ""
        if wrong or full and not full["correct"]:
            print(f"{key}: misread {pairs or 'nothing'}{' (star confused)' if star_confused else ''}{answer}", flush=True)
    print(f"{len(samples)} prompts, {boards} boards: {wrong_boards} boards with a misread token, "
          f"{star_prompts} prompts with the star confused; tokens more than {FAR:.0%} from their target: "
          f"{far} of {tokens} ({far / tokens:.4%})")
    print("misread (target -> read):", dict(misread.most_common()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--images", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--per-kind", type=int, default=16, help="needle prompts per image count")
    parser.add_argument("--results", help="benchmarks/multimodal.py JSONL: show the full cache's answers")
    parser.add_argument("--weights", default=str(coder_vlm.ASSET_DIR), help="the vision path's directory")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, processor = coder_vlm.load_coder_vlm(torch.bfloat16, directory=Path(args.weights))
    results = None
    if args.results:
        rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
        results = {r["task"].rsplit("-", 2)[0]: r for r in rows if r["method"] == "FullKV"}
    samples = [s for n in args.images for s in make_split(args.split, "needle", args.per_kind, coder_vlm.TASK_CONFIG,
                                                          num_images=n)]
    board_errors(model, tokenizer, processor, samples, results)


if __name__ == "__main__":
    main()
