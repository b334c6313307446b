"""``hybridkv demo``: full cache and HybridKV side by side on a multi-image prompt.

By default it runs offline on the bundled tiny VLM (``hybridkv/assets/tiny_vlm``) and a
visual needle-in-a-haystack question from the test split of :mod:`hybridkv.data.visual_tasks`.
``--model`` takes a local (or hub) Qwen2.5-VL checkpoint instead; ``--image`` / ``--prompt``
take your own images and question. It prints both answers, the KV bytes, the decode ms/token
and the head-type summary, and saves a PNG of the images with the visual tokens that one
static head and one dynamic head of HybridKV hold (and, for the dynamic head, those it
retrieved at the last step).

The assistant header (``<|im_start|>assistant\n``) is fed after compression, as in
``benchmarks/multimodal.py``: otherwise a one-word answer would come from the full-attention
prefill, identical for every method, and the side-by-side would show nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from hybridkv.data.visual_eval import tail_length
from hybridkv.device import device_name
from hybridkv.head_profile import HeadProfile
from hybridkv.methods import FullKV, HybridKV
from hybridkv.methods.base import Method
from hybridkv.step_timer import timed_generate

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@dataclass
class DemoRun:
    """One method's result: answer text, report, median decode ms/token and, for the picture,
    the (layer, head) of a static and a dynamic head with the positions each holds and retrieved."""

    name: str
    answer: str
    report: object
    ms_per_token: float
    heads: tuple = (None, None)
    held: dict = field(default_factory=dict)


def load_demo_model(model_path: str | None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer, image_processor, chat_prefix): the bundled VLM, or a Qwen2.5-VL checkpoint."""
    if model_path is None:
        try:
            from hybridkv.models.tiny_vlm import load_tiny_vlm

            return (*load_tiny_vlm(dtype=dtype, device=device), "")
        except (ImportError, OSError) as error:
            raise SystemExit(
                f"the bundled tiny VLM is not available in this install ({error}); "
                "run the demo on a Qwen2.5-VL checkpoint: hybridkv demo --model PATH"
            ) from error
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_path), Qwen2VLImageProcessor.from_pretrained(model_path), QWEN_SYSTEM


def build_prompt(tokenizer, image_processor, images: list[Image.Image], question: str, chat_prefix: str) -> dict:
    """Qwen2.5-VL chat prompt with one vision run per image (the processor's expansion, without torchvision)."""
    vision = image_processor(images=images, return_tensors="pt")
    merge = image_processor.merge_size**2
    runs = "".join("<|vision_start|>" + "<|image_pad|>" * (int(t * h * w) // merge) + "<|vision_end|>"
                   for t, h, w in vision["image_grid_thw"].tolist())
    text = f"{chat_prefix}<|im_start|>user\n{runs}{question}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"]}


def run_method(model, tokenizer, inputs: dict, name: str, method: Method, new_tokens: int,
               picture: bool = False) -> DemoRun:
    """Greedy answer under ``method`` with each decoding step timed inside ``generate()``; the
    assistant header is fed after compression. With ``picture``, also the prompt positions one
    static and one dynamic head hold (and retrieved at the last step)."""
    header = tail_length(tokenizer, inputs["input_ids"], "answer-after")
    with method.apply(model) as engine:
        run = timed_generate(model, inputs, new_tokens, tail_tokens=header)
        report = engine.report
        heads = pick_heads(report) if picture else (None, None)
        held = {head: engine.layers[head[0]].row_positions(0, head[1]) for head in heads if head is not None}
    tokens = run.tokens[0].tolist()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
    return DemoRun(name, tokenizer.decode(tokens, skip_special_tokens=True).strip(), report, run.median_ms, heads, held)


def pick_heads(report) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(layer, head) of one static and one dynamic head, from the middle layers outwards; a
    dynamic head with a chunk pool is preferred (at small budgets some hold only text)."""
    types = report.head_types
    pools = report.extra.get("pool_chunks") or [[0] * len(row) for row in types]
    order = sorted(range(len(types)), key=lambda i: abs(i - len(types) // 2))
    static = next(((i, h) for i in order for h, t in enumerate(types[i]) if t == "static"), None)
    dynamic = sorted(((i, h) for i in order for h, t in enumerate(types[i]) if t == "dynamic"),
                     key=lambda head: pools[head[0]][head[1]] == 0)
    return static, (dynamic[0] if dynamic else None)


def overlay_png(images: list[Image.Image], inputs: dict, image_token_id: int, merge: int, run: DemoRun,
                path: str | Path) -> None:
    """Images in a row; per picked head a row with its held (and retrieved) visual tokens shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    ids = inputs["input_ids"][0]
    visual = (ids == image_token_id).nonzero().flatten().tolist()
    grids = [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
    static, dynamic = run.heads
    heads = [(f"static head L{static[0]}H{static[1]}", static)] if static else []
    heads += [(f"dynamic head L{dynamic[0]}H{dynamic[1]}", dynamic)] if dynamic else []
    fig, axes = plt.subplots(len(heads), len(images), figsize=(1.8 * len(images), 2.0 * len(heads)), squeeze=False)
    for row, (title, head_of_layer) in enumerate(heads):
        held, retrieved = run.held[head_of_layer]
        offset = 0
        for col, (image, (gh, gw)) in enumerate(zip(images, grids)):
            ax = axes[row][col]
            ax.imshow(image)
            cell_h, cell_w = image.height / gh, image.width / gw
            for k in range(gh * gw):
                position = visual[offset + k]
                colour = "orange" if position in retrieved else ("lime" if position in held else None)
                if colour:
                    r, c = divmod(k, gw)
                    ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, color=colour, alpha=0.45))
            offset += gh * gw
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.suptitle("visual tokens held (green) and retrieved at the last step (orange)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(model_path: str | None = None, image_paths: list[str] | None = None, prompt: str | None = None,
             budget: float = 0.1, num_images: int = 16, seed: int = 0, new_tokens: int = 4,
             out: str | Path = "hybridkv_demo.png", profile: str | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> tuple[DemoRun, DemoRun]:
    """Run the demo and print its summary; returns the (FullKV, HybridKV) runs."""
    model, tokenizer, image_processor, chat_prefix = load_demo_model(model_path, dtype, device)
    expected = None
    if image_paths:
        images = [Image.open(p).convert("RGB") for p in image_paths]
        question = prompt or "Describe the images."
    else:
        from hybridkv.data.visual_tasks import make_sample, split_seeds

        sample = make_sample("needle", split_seeds("test", seed + 1)[seed], num_images=num_images)
        images, question, expected = sample.images(), prompt or sample.question, sample.answer
    inputs = {k: v.to(model.device) for k, v in build_prompt(tokenizer, image_processor, images, question,
                                                             chat_prefix).items()}
    head_profile = HeadProfile.load(profile) if profile else _bundled_profile(model_path)
    full = run_method(model, tokenizer, inputs, "FullKV", FullKV(), new_tokens)
    method = HybridKV(budget, profile=head_profile)
    hybrid = run_method(model, tokenizer, inputs, f"HybridKV@{budget}", method, new_tokens, picture=True)
    print(f"model on {device_name(model.device)}, {dtype}; prompt: {inputs['input_ids'].shape[1]} tokens, "
          f"{len(images)} images, "
          f"{hybrid.report.visual_tokens} visual tokens; question: {question!r}"
          + (f" (expected: {expected})" if expected else ""))
    for run in (full, hybrid):
        r = run.report
        print(f"{run.name:>14}: answer {run.answer!r:<12} KV held {(r.resident_kv_bytes + r.offloaded_kv_bytes) / 2**20:8.2f} MiB"
              f" ({r.compression_ratio:4.1f}x less than the full cache)  decode {run.ms_per_token:6.1f} ms/token")
    types = [t for row in hybrid.report.head_types for t in row]
    print(f"HybridKV heads ({hybrid.report.profile_source} profile): {types.count('static')} static, "
          f"{types.count('dynamic')} dynamic")
    try:
        overlay_png(images, inputs, model.config.image_token_id, image_processor.merge_size, hybrid, out)
        print(f"kept-token picture: {out}")
    except ImportError:
        print("kept-token picture skipped: it needs matplotlib (pip install 'hybridkv[plot]')")
    return full, hybrid


def _bundled_profile(model_path: str | None) -> HeadProfile | None:
    """The head profile shipped with the bundled model (None for other models: online classification)."""
    if model_path is not None:
        return None
    from hybridkv.models.tiny_vlm import ASSET_DIR

    path = ASSET_DIR / "profile.json"
    return HeadProfile.load(path) if path.exists() else None
