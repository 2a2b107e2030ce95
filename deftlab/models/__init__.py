"""Models: named configs (configs/models), loading with the embedded-GGUF safetensors cache, tiny test models."""

from deftlab.models.config import DEFAULT_MODEL, ModelConfig
from deftlab.models.loading import LoadedModel, load_model, resolve_spec
from deftlab.models.registry import ModelSpec, get_spec, model_specs

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelConfig", "ModelSpec", "get_spec", "load_model", "model_specs", "resolve_spec"]
