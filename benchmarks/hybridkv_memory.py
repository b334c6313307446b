"""KV bytes really held after generate() at a 10% budget on a ~1000-visual-token prompt.

Tiny random Qwen2.5-VL (head_dim 128, 4 layers, 2 KV heads), 4 images x 256 visual tokens;
bytes are walked from the cache's tensor storages (prefix, recent block, chunk pools and
their summaries, index tensors) and compared with the DynamicCache of plain generate().

    python benchmarks/hybridkv_memory.py [--new-tokens 8]
"""

import argparse

from hybridkv import HybridKV, held_bytes
from hybridkv.bench import dynamic_cache_bytes
from hybridkv.models.tiny import tiny_model, visual_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.1)
    args = parser.parse_args()
    vocab = 2048
    model = tiny_model("qwen2_5_vl", hidden_size=512, heads=4, kv_heads=2, layers=4, vocab_size=vocab)
    inputs = visual_inputs(images=4, grid=32, vocab_size=vocab)
    plain = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True)
    full = dynamic_cache_bytes(plain.past_key_values)
    print(f"prompt {inputs['input_ids'].shape[1]} tokens ({int((inputs['input_ids'] == model.config.image_token_id).sum())}"
          f" visual), {args.new_tokens} new tokens; plain DynamicCache: {full} bytes")
    for store in ("device", "host"):
        method = HybridKV(args.budget, store=store)
        with method.apply(model) as engine:
            model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            walked = sum(sum(held_bytes(layer).values()) for layer in engine.cache.layers)
        report = method.report
        types = [t for row in report.head_types for t in row]
        print(f"HybridKV@{args.budget} store={store}: held {walked} bytes (walked) = resident "
              f"{report.resident_kv_bytes} + offloaded {report.offloaded_kv_bytes}; {full / walked:.2f}x below the "
              f"full cache; {types.count('dynamic')}/{len(types)} heads dynamic")


if __name__ == "__main__":
    main()
