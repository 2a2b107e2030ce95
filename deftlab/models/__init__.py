"""Models: named configs (configs/models), loading with the embedded-GGUF safetensors cache, tiny test models."""

from deftlab.models.loading import LoadedModel, load_model, resolve_spec
from deftlab.models.registry import ModelSpec, get_spec, model_specs

__all__ = ["LoadedModel", "ModelSpec", "get_spec", "load_model", "model_specs", "resolve_spec"]
