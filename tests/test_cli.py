"""The command line on a tiny checkpoint saved in the test (no downloads)."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hybridkv.cli import main
from hybridkv.models.tiny import tiny_model
from hybridkv.profile import HeadProfile


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama and a character-level tokenizer saved as a transformers checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(path)
    tiny_model("llama", vocab_size=len(vocab)).save_pretrained(path)
    return path


def test_profile_command_writes_json_and_heatmap(checkpoint, tmp_path, capsys):
    out = tmp_path / "profile.json"
    main(["--threads", "1", "profile", "--model", str(checkpoint), "--out", str(out), "--samples", "2",
          "--length", "200", "--decode-tokens", "3"])
    profile = HeadProfile.load(out)
    assert profile.identity["model_type"] == "llama"
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert "KV heads dynamic" in capsys.readouterr().out


def test_eval_command_writes_tables_and_resumes(checkpoint, tmp_path):
    out = tmp_path / "quality"
    argv = ["--threads", "1", "eval", "--model", str(checkpoint), "--task", "needle", "--lengths", "200",
            "--depths", "0.5", "--methods", "SnapKV", "HybridKV", "--budgets", "0.2", "--max-new-tokens", "3",
            "--out", str(out)]
    main(argv)
    rows = Path(f"{out}.jsonl").read_text().splitlines()
    assert len(rows) == 3 and {json.loads(r)["method"] for r in rows} == {"FullKV", "SnapKV", "HybridKV"}
    assert "| SnapKV |" in Path(f"{out}.md").read_text()
    assert Path(f"{out}.png").exists() and Path(f"{out}.csv").exists()
    main(argv)  # resumed: nothing new
    assert len(Path(f"{out}.jsonl").read_text().splitlines()) == 3


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a known model"):
        main(["generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi"])


def test_eval_split_draws_visual_questions_from_it_and_text_tasks_refuse_it(checkpoint, tmp_path):
    from hybridkv.data.visual_tasks import split_seeds

    out = tmp_path / "validation"
    main(["--threads", "1", "eval", "--model", "tiny-vlm", "--task", "visual-count", "--per-kind", "2", "--split",
          "validation", "--methods", "SnapKV", "--budgets", "0.4", "--max-new-tokens", "2", "--out", str(out)])
    tasks = {json.loads(r)["task"] for r in Path(f"{out}.jsonl").read_text().splitlines()}
    assert len(tasks) == 2
    assert all(any(f"s{seed}" in task for seed in split_seeds("validation", 2)) for task in tasks)
    assert not any(f"s{seed}-" in task for seed in split_seeds("test", 2) for task in tasks)
    with pytest.raises(SystemExit, match="--split applies to visual tasks"):
        main(["eval", "--model", str(checkpoint), "--task", "needle", "--split", "validation", "--out", str(out)])


def test_eval_weights_load_that_directory_and_name_its_rows(checkpoint, tmp_path):
    import torch

    from hybridkv.models.tiny_vlm import load_tiny_vlm, save_tiny_vlm
    from hybridkv.models.visual_models import visual_model

    model, tokenizer, processor = load_tiny_vlm()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    weights = tmp_path / "retrained"
    save_tiny_vlm(model, tokenizer, processor, weights)
    loaded, _, _ = visual_model("tiny-vlm").load(weights=weights)
    assert not loaded.lm_head.weight.any() and load_tiny_vlm()[0].lm_head.weight.any()

    out = tmp_path / "quality"
    main(["--threads", "1", "eval", "--model", "tiny-vlm", "--weights", str(weights), "--task", "visual-count",
          "--per-kind", "1", "--methods", "--budgets", "0.4", "--max-new-tokens", "2", "--out", str(out)])
    rows = [json.loads(r) for r in Path(f"{out}.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == [f"tiny-vlm@{weights}"]  # never resumed into the bundled model's rows
    for command in (["eval", "--out", str(out)], ["profile", "--out", str(tmp_path / "profile.json")]):
        with pytest.raises(SystemExit, match="--weights applies to tiny-vlm and coder-vlm"):
            main([*command, "--model", str(checkpoint), "--weights", str(weights)])
