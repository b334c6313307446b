"""Stage 1 of HybridKV, its result: every KV head's staticness, importance and type, as a
:class:`HeadProfile` tied to the model it was made for (made by :func:`hybridkv.profile.profile_heads`).

For a KV head (query heads of a GQA group averaged) and a prompt with context (visual) tokens V:

* ``a_text`` (V,): the text-prior queries' attention over the context tokens, averaged over
  those queries and renormalised over V;
* ``a_t`` (V,): the attention over the context tokens of decoding step ``t``, renormalised;
* **staticness** ``s = mean_t sum_{i in TopK(a_text, k)} a_t[i]``, ``k = ceil(topk_share * V)``:
  the share of what decoding reads that the text prior already points at;
* **importance**: the raw attention mass decoding puts on context tokens (mean over steps).

A head is dynamic when ``s < threshold``; at most ``max_dynamic_share`` of all heads are
dynamic (the least static ones).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybridkv.models.architectures import model_spec

PROFILE_FORMAT = "hybridkv.head_profile/1"
_IDENTITY_SKIP = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_attn_implementation",
                  "_attn_implementation_internal", "use_cache", "output_attentions", "output_hidden_states", "return_dict"}


class ProfileMismatchError(ValueError):
    """A head profile was made for another model (or is not a profile file)."""


def model_identity(model: torch.nn.Module) -> dict:
    """Architecture, geometry and a hash of the text config's architecture fields."""
    spec = model_spec(model)
    text = model.config.get_text_config(decoder=True).to_dict()
    arch = {k: v for k, v in sorted(text.items()) if k not in _IDENTITY_SKIP and not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"model_type": spec.model_type, "num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "config_hash": digest}


def classify(staticness: torch.Tensor, threshold: float, max_dynamic_share: float) -> list[list[str]]:
    """Head types from staticness (layers, kv_heads): dynamic below ``threshold``, capped to the
    ``max_dynamic_share`` least static heads."""
    flat = staticness.flatten()
    cap = int(max_dynamic_share * flat.numel())
    order = flat.argsort()  # least static first
    dynamic = torch.zeros_like(flat, dtype=torch.bool)
    dynamic[order[:cap]] = flat[order[:cap]] < threshold
    types = ["dynamic" if d else "static" for d in dynamic.tolist()]
    width = staticness.shape[1]
    return [types[i : i + width] for i in range(0, len(types), width)]


def top_prior(a_text: torch.Tensor, topk_share: float) -> torch.Tensor:
    """(H, k) indices of each head's ``ceil(topk_share * V)`` highest text-prior context tokens."""
    k = max(1, math.ceil(topk_share * a_text.shape[-1]))
    return a_text.topk(min(k, a_text.shape[-1]), dim=-1).indices


@dataclass
class HeadProfile:
    """Per layer and KV head: staticness, importance and type, plus the model identity.

    Attributes:
        identity: :func:`model_identity` of the profiled model.
        staticness / importance: (layers, kv_heads) nested lists of floats.
        head_types: (layers, kv_heads) ``"static"`` / ``"dynamic"``.
        params: the classification parameters (threshold, topk_share, max_dynamic_share,
            decode_tokens) and the number of samples.
    """

    identity: dict
    staticness: list[list[float]]
    importance: list[list[float]]
    head_types: list[list[str]]
    params: dict = field(default_factory=dict)

    @property
    def dynamic_share(self) -> float:
        """Share of KV heads classified dynamic."""
        flat = [t for row in self.head_types for t in row]
        return flat.count("dynamic") / len(flat)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`ProfileMismatchError` unless this profile was made for ``model``'s architecture."""
        mine = model_identity(model)
        if mine != self.identity:
            raise ProfileMismatchError(
                f"this head profile was made for {self.identity}, not for this model ({mine}); "
                "run `hybridkv profile --model ...` (or profile_heads) on this model."
            )

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON."""
        data = {"format": PROFILE_FORMAT, "identity": self.identity, "staticness": self.staticness,
                "importance": self.importance, "head_types": self.head_types, "params": self.params}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        """Read a profile written by :meth:`save`; a malformed file is a clear error."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ProfileMismatchError(f"cannot read head profile {path}: {error}") from error
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ProfileMismatchError(f"{path} is not a hybridkv head profile (expected format {PROFILE_FORMAT!r}).")
        try:
            profile = cls(data["identity"], data["staticness"], data["importance"], data["head_types"], data["params"])
            layers, heads = profile.identity["num_layers"], profile.identity["num_kv_heads"]
            shapes = {(len(m), *{len(r) for r in m}) for m in (profile.staticness, profile.importance, profile.head_types)}
        except (KeyError, TypeError) as error:
            raise ProfileMismatchError(f"{path} is a malformed head profile: missing or bad {error}.") from error
        if shapes != {(layers, heads)} or not {t for r in profile.head_types for t in r} <= {"static", "dynamic"}:
            raise ProfileMismatchError(f"{path} is a malformed head profile: tables are not {layers} x {heads} of known types.")
        return profile


