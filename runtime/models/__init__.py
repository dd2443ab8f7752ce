"""Bundled model zoo and user-model loading; see :mod:`runtime.models.registry`."""

from runtime.models.registry import build_model, get_spec, list_models, load_labels
from runtime.models.spec import ModelSpec, preprocess

__all__ = ["ModelSpec", "build_model", "get_spec", "list_models", "load_labels", "preprocess"]
