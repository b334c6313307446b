"""Models hybridkv knows: supported architectures, real-weights loaders, tiny random models."""

from hybridkv.models.loading import load_model
from hybridkv.models.pretrained import KNOWN_MODELS, load_pretrained

__all__ = ["KNOWN_MODELS", "load_model", "load_pretrained"]
