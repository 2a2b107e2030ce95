"""A decomposed (low-rank factored) model for `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Written by `deftlab export --format factored` into the export as modeling_deftlab.py. It must not import deftlab:
whoever loads the export has only torch and transformers. The base architecture's own classes are used unchanged;
after their __init__, each linear named in `config.factored_ranks` ({module name: rank}, names as in the causal LM)
is swapped in place for `FactoredLinear` (y = u_proj(v_proj(x)): v_proj rank×in, u_proj out×rank holding the
bias), so the checkpoint's `<name>.v_proj.weight` / `<name>.u_proj.weight` load into it and the model has the
decomposed parameter count. Linears not listed stay dense (including rank-reduced ones stored dense).
"""

from torch import nn

# base architecture: deftlab export rewrites this one line for non-LLaMA models
from transformers import LlamaConfig as _BaseConfig, LlamaForCausalLM as _BaseForCausalLM, LlamaModel as _BaseModel


class FactoredLinear(nn.Module):
    """y = u_proj(v_proj(x)); the two factors are plain nn.Linear children (v_proj: rank×in, u_proj: out×rank)."""

    def __init__(self, in_features, out_features, rank, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.v_proj = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.u_proj = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self):
        return self.v_proj.out_features

    def forward(self, x):
        return self.u_proj(self.v_proj(x))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorize_linears(model, ranks, prefix=""):
    """Swap the nn.Linear modules named in `ranks` for FactoredLinear of that rank (same device and dtype).

    prefix: dropped from each name (the causal LM's "model." when `model` is the bare base model); names
    without it are skipped there (e.g. lm_head). Returns the swapped names."""
    done = []
    for name, rank in sorted(ranks.items()):
        if prefix:
            if not name.startswith(prefix):
                continue
            name = name[len(prefix):]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, FactoredLinear):
            continue
        if not isinstance(old, nn.Linear):
            raise ValueError(f"factored_ranks names '{name}', a {type(old).__name__}, not an nn.Linear")
        w = old.weight
        setattr(parent, attr, FactoredLinear(old.in_features, old.out_features, int(rank), bias=old.bias is not None,
                                             device=w.device, dtype=w.dtype))
        done.append(name)
    return done


class DeftlabFactoredConfig(_BaseConfig):
    """The base config plus `factored_ranks` ({module name: rank}) and `base_model_type` (kept as extra fields)."""

    model_type = "deftlab_factored"
    # tensor-parallel plans name the dense projections, which are factored here: load/serve on one device
    base_model_tp_plan = None


class DeftlabFactoredModel(_BaseModel):
    config_class = DeftlabFactoredConfig

    def __init__(self, config):
        super().__init__(config)
        prefix = f"{getattr(_BaseForCausalLM, 'base_model_prefix', 'model')}."
        factorize_linears(self, getattr(config, "factored_ranks", None) or {}, prefix=prefix)


class DeftlabFactoredForCausalLM(_BaseForCausalLM):
    config_class = DeftlabFactoredConfig

    def __init__(self, config):
        super().__init__(config)
        factorize_linears(self, getattr(config, "factored_ranks", None) or {})


__all__ = ["DeftlabFactoredConfig", "DeftlabFactoredForCausalLM", "DeftlabFactoredModel", "FactoredLinear",
           "factorize_linears"]
