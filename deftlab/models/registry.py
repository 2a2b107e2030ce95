"""Named model configs (configs/models/*.yaml), typed and validated."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from deftlab.config import from_dict, load_yaml
from deftlab.errors import DeftlabError, UnknownNameError
from deftlab.paths import configs_dir

DTypeName = Literal["float32", "bfloat16", "float16", "auto"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: Literal["gguf_package", "hub", "local", "tiny"]
    hub_id: str | None = None
    package: str | None = None  # python package that ships a GGUF file
    gguf_file: str | None = None
    path: str | None = None  # local directory (source: local)
    dtype: DTypeName = "float32"
    params: str | None = None
    description: str = ""
    # the HF config fields of the architecture (model_type, hidden_size, ...): shapes for deftlab.models.meta
    arch: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.source == "gguf_package" and not (self.package and self.gguf_file):
            raise DeftlabError(f"model config '{self.name}': source gguf_package needs package and gguf_file")
        if self.source == "hub" and not self.hub_id:
            raise DeftlabError(f"model config '{self.name}': source hub needs hub_id")
        if self.source == "local" and not self.path:
            raise DeftlabError(f"model config '{self.name}': source local needs path")


@lru_cache(maxsize=1)
def model_specs() -> dict[str, ModelSpec]:
    specs = {}
    for f in sorted((configs_dir() / "models").glob("*.yaml")):
        spec = from_dict(ModelSpec, load_yaml(f), where=str(f))
        specs[spec.name] = spec
    return specs


def get_spec(name: str) -> ModelSpec:
    specs = model_specs()
    if name not in specs:
        raise UnknownNameError("model", name, list(specs) + ["<a local model directory>"])
    return specs[name]
