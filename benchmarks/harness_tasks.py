"""Write offline task folders for lm-eval and lmms-eval, and print the commands that run them.

- ``<out>/lm_eval/hkv_needle``: hybridkv's pass-key needle prompts (real licence text, see
  :mod:`hybridkv.data.text_tasks`) as an lm-eval ``generate_until`` task, scored as
  ``hybridkv eval`` scores them (the first number of the answer is the key).
- ``<out>/lmms_eval/hkv_visual``: the bundled tiny VLM's test-split visual questions (cell
  colour and the 8-image visual needle) as an lmms-eval task; the images are regenerated from
  each document's seed, so the folder holds no image files.

    python benchmarks/harness_tasks.py --out /tmp/hkv_tasks [--model smollm2-135m] [--length 1024]
"""

import argparse
from pathlib import Path

from hybridkv.integrations.example_tasks import NEEDLE_UTILS, NEEDLE_YAML, VISUAL_UTILS, VISUAL_YAML, visual_docs, write_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2-135m", help="the text model whose tokenizer sizes the needle prompts")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--per-kind", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)

    from hybridkv.data.text_tasks import TextTaskBuilder
    from hybridkv.data.visual_eval import visual_tasks
    from hybridkv.models.pretrained import load_pretrained
    from hybridkv.models.tiny_vlm import load_tiny_vlm

    _, tokenizer = load_pretrained(args.model)
    builder = TextTaskBuilder(tokenizer)
    depths = [i / max(1, args.per_kind - 1) * 0.9 + 0.05 for i in range(args.per_kind)]
    needles = [builder.needle(args.length, depth, 0) for depth in depths]
    write_task(out / "lm_eval" / "hkv_needle", NEEDLE_YAML, NEEDLE_UTILS,
               [{"prompt": tokenizer.decode(t.input_ids[0]), "answer": t.answer} for t in needles])

    _, vlm_tokenizer, processor = load_tiny_vlm()
    tasks = visual_tasks(vlm_tokenizer, processor, ["cell_colour", "needle"], args.per_kind, num_images=[8])
    write_task(out / "lmms_eval" / "hkv_visual", VISUAL_YAML, VISUAL_UTILS, visual_docs(tasks))

    query = needles[0].query_tokens
    print(f"python -m hybridkv.integrations.lm_eval run --model hybridkv --model_args "
          f"pretrained={args.model},method=HybridKV,budget=0.1,query_tokens={query} --tasks hkv_needle "
          f"--include_path {out / 'lm_eval'} --device cpu")
    print(f"lmms-eval --model hybridkv --model_args pretrained=tiny-vlm,method=HybridKV,budget=0.1 --tasks hkv_visual "
          f"--include_path {out / 'lmms_eval'} --batch_size 1 --device cpu")


if __name__ == "__main__":
    main()
