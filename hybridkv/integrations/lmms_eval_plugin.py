"""The ``lmms_eval.models`` entry point: tells lmms-eval where the ``hybridkv`` model lives.

Kept apart from :mod:`hybridkv.integrations.lmms_eval` so that lmms-eval reading its plugins
imports neither torch nor the model class until ``--model hybridkv`` is asked for.
"""

from __future__ import annotations


def manifests() -> list:
    """lmms-eval's ``ModelManifest`` of the ``hybridkv`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="hybridkv", simple_class_path="hybridkv.integrations.lmms_eval.HybridKVLMMs")]
