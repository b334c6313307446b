"""The decode-speed benchmark (hybridkv bench): every method timed inside generate(), ops and host syncs counted."""

import argparse

from hybridkv.speed import add_arguments, run


def test_bench_times_every_method_and_counts_ops(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--setting", "llama24", "--layers", "2", "--contexts", "256", "512", "--steps", "3",
                              "--warmup", "1", "--rounds", "1", "--full-attention-max", "256",
                              "--out", str(tmp_path / "speed")])
    rows = run(args)
    names = {r["method"] for r in rows if r["context"] == 256}
    assert names == {"plain DynamicCache", "FullKV", "HybridKV-host@0.1",
                     *(f"{m}@0.1" for m in ("AdaKV", "H2O", "HybridKV", "PyramidKV", "Quest", "SnapKV", "StreamingLLM"))}
    assert {r["method"] for r in rows if r["context"] == 512} == names - {"H2O@0.1"}  # above --full-attention-max
    assert all(r["host_syncs_per_step"] == 0 and r["aten_ops_per_layer_step"] > 0 and r["decode_ms_per_token"] > 0
               for r in rows)
    compressed = [r for r in rows if r["method"].startswith("SnapKV")]
    full = [r for r in rows if r["method"] == "FullKV"]
    assert all(c["kv_bytes_held"] < f["kv_bytes_held"] / 5 for c, f in zip(compressed, full))
    assert (tmp_path / "speed.csv").exists() and (tmp_path / "speed.png").exists()
