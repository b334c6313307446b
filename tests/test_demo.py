"""`hybridkv demo` end to end on the bundled tiny VLM (small setting)."""

from hybridkv.data.visual_tasks import make_sample, split_seeds
from hybridkv.demo import run_demo


def test_demo_runs_offline_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "demo.png"
    full, hybrid = run_demo(budget=0.2, num_images=4, seed=0, new_tokens=2, out=out)
    expected = make_sample("needle", split_seeds("test", 1)[0], num_images=4).answer
    assert full.answer.split()[0] == expected
    assert hybrid.report.compression_ratio > 3.0
    assert hybrid.report.visual_tokens > 0 and out.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "FullKV" in printed and "HybridKV@0.2" in printed and "static" in printed
