"""Export a fine-tuned run as a standalone Hugging Face model directory (`deftlab export`).

Two formats, both with the tokenizer (when it is an HF tokenizer), generation_config.json and `deftlab_export.json`:

factored  the decomposed model at its own parameter count: safetensors with LowRankLinear layers as
          `<name>.v_proj.weight` / `<name>.u_proj.weight`, config.json of model_type "deftlab_factored" carrying
          `factored_ranks` ({module name: rank}) and an `auto_map` to the bundled modeling_deftlab.py (copied from
          deftlab/models/modeling_factored.py; imports only torch and transformers), plus the run's rank map
          (rank_map.json, the format of `deftlab.adapters.checkpoint`). Load with trust_remote_code=True.
merged    the base architecture: each factored layer multiplied back to W_u·W_v; loads with no remote code.

The exported model is the one the run evaluated: its trained tensors loaded (`load_finetuned`), LoRA merged
(`merge_for_eval`: into dense weights, or concatenated into the factors), and 4-bit (NF4) weights of QLoRA runs
dequantised to their float values; the export record says whether that happened.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from deftlab.errors import DeftlabError
from deftlab.manifest import git_commit, package_versions, write_json_atomic
from deftlab.models.factored_format import FACTORED_EXPORT_TYPE as MODEL_TYPE
from deftlab.models.factored_format import MODELING_FILE, RECORD_FILE, modeling_source_for
from deftlab.surgery.lowrank import LowRankLinear, linear_weight
from deftlab.surgery.params import count_params
from deftlab.surgery.quantize import is_4bit
from deftlab.surgery.replace import get_parent

Format = Literal["factored", "merged"]
FORMATS = ("factored", "merged")
RECORD_FORMAT = "deftlab-export-v1"
AUTO_MAP = {
    "AutoConfig": "modeling_deftlab.DeftlabFactoredConfig",
    "AutoModel": "modeling_deftlab.DeftlabFactoredModel",
    "AutoModelForCausalLM": "modeling_deftlab.DeftlabFactoredForCausalLM",
}
_PACKAGES = ("deftlab", "torch", "transformers", "safetensors", "peft", "bitsandbytes")


# --- resolving a run ---------------------------------------------------------------------------------------------
def resolve_run(run: str | os.PathLike, results: str | os.PathLike | None = None) -> Path:
    """A recorded run's directory from a path, or from a key / key prefix / kind/key in the results store."""
    from deftlab.store import RECORD, ResultsStore

    path = ResultsStore(results).locate(run)
    if not (path / RECORD).is_file():
        raise DeftlabError(f"{path} has no {RECORD}", "pass a recorded run's directory, key or kind/key")
    return path


# --- preparing the model -----------------------------------------------------------------------------------------
@torch.no_grad()
def dequantize_4bit_linears(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes Linear4bit (dense, or a factor) by an nn.Linear of its dequantised weight."""
    done = []
    for name, module in list(model.named_modules()):
        if not is_4bit(module):
            continue
        weight = linear_weight(module)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach().to(weight.dtype).clone(), requires_grad=False)
        parent, attr = get_parent(model, name)
        setattr(parent, attr, plain)
        done.append(name)
    if getattr(model, "is_loaded_in_4bit", False):
        model.is_loaded_in_4bit = False
    return done


@torch.no_grad()
def multiply_factors(model: nn.Module) -> list[str]:
    """Replace every LowRankLinear by an nn.Linear holding W_u·W_v (product in fp32, stored in the factors' dtype)."""
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        W_u, W_v = module.factors()
        dtype = W_u.dtype
        weight = (W_u.float() @ W_v.float()).to(dtype)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.u_proj.bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if module.u_proj.bias is not None:
            dense.bias = nn.Parameter(module.u_proj.bias.detach().clone(), requires_grad=False)
        parent, attr = get_parent(model, name)
        setattr(parent, attr, dense)
        done.append(name)
    return done


def _check_exportable(model: nn.Module) -> None:
    from deftlab.adapters.bottleneck import BottleneckAdapter

    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise DeftlabError("the model still has a PEFT adapter", "merge it first (merge_for_eval)")
    extra = [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    if extra:
        raise DeftlabError(f"bottleneck adapters ({extra[0]}, ...) are modules the base architecture lacks",
                           "export LoRA / QLoRA / LRC / full runs; series/parallel adapters have no HF equivalent")
    if any(is_4bit(m) for m in model.modules()):
        raise DeftlabError("the model has 4-bit weights", "dequantise them first (dequantize_4bit_linears)")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise DeftlabError(f"a {type(model).__name__} is not a Hugging Face model", "export an HF causal LM")


# --- writing -----------------------------------------------------------------------------------------------------
def factored_ranks(model: nn.Module) -> dict[str, int]:
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def modeling_source(model: nn.Module) -> str:
    """The bundled modeling file with its base-architecture import pointing at `model`'s classes."""
    return modeling_source_for((type(model.config).__name__, type(model).__name__, type(model.base_model).__name__))


def _factored_config(model: nn.Module, ranks: dict[str, int]) -> dict:
    config = model.config.to_dict()
    config.update(model_type=MODEL_TYPE, base_model_type=model.config.model_type,
                  architectures=["DeftlabFactoredForCausalLM"], auto_map=dict(AUTO_MAP),
                  factored_ranks=dict(sorted(ranks.items())))
    return config


def _save_tokenizer(tokenizer, out: Path) -> str | None:
    if tokenizer is None:
        return "no tokenizer given"
    if not hasattr(tokenizer, "save_pretrained"):
        return f"{type(tokenizer).__name__} is not a Hugging Face tokenizer; not saved"
    tokenizer.save_pretrained(str(out))
    return None


def _dir_bytes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def export_model(model: nn.Module, out_dir: str | os.PathLike, fmt: Format, *, tokenizer=None,
                 rank_map: dict | None = None, record: dict | None = None, overwrite: bool = False) -> dict:
    """Write `model` (merged, float: see `prepare`) to `out_dir` in format `fmt`; returns the export record.

    The model is changed in place for "merged" (factors multiplied back). rank_map: the run's rank map, written
    beside a factored export as rank_map.json. record: extra fields for the export record. The directory is
    written under a temporary name and renamed into place, so a failed export leaves nothing half-written.
    """
    if fmt not in FORMATS:
        raise DeftlabError(f"unknown export format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    _check_exportable(model)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DeftlabError(f"{out} exists and is not empty", "choose another directory, or pass --force")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ranks = factored_ranks(model)
        if fmt == "merged":
            multiply_factors(model)
        params = count_params(model)["total"]
        model.save_pretrained(str(tmp))  # safetensors (sharded when large), tied weights once, generation config
        if fmt == "factored":
            (tmp / "config.json").write_text(json.dumps(_factored_config(model, ranks), indent=2, sort_keys=True)
                                             + "\n")
            (tmp / MODELING_FILE).write_text(modeling_source(model))
            if rank_map is not None:
                (tmp / "rank_map.json").write_text(json.dumps(rank_map, indent=1))
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").is_file():
            model.generation_config.save_pretrained(str(tmp))
        tokenizer_note = _save_tokenizer(tokenizer, tmp)
        files = _dir_bytes(tmp)
        rec = {
            "format": RECORD_FORMAT,
            "export_format": fmt,
            **(record or {}),
            "architecture": type(model).__name__,
            "base_model_type": model.config.model_type,
            "load": ("AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)" if fmt == "factored"
                     else "AutoModelForCausalLM.from_pretrained(DIR)"),
            "factored_ranks": dict(sorted(ranks.items())) if fmt == "factored" else {},
            "factored_layers": len(ranks) if fmt == "factored" else 0,
            "multiplied_back": len(ranks) if fmt == "merged" else 0,  # factored layers stored as W_u·W_v
            "params": params,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "weights_bytes": sum(v for k, v in files.items() if k.endswith(".safetensors")),
            "bytes": sum(files.values()),
            "files": files,
            "tokenizer": tokenizer_note or "saved",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "packages": package_versions(_PACKAGES),
        }
        write_json_atomic(tmp / RECORD_FILE, rec)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rec


# --- a run -------------------------------------------------------------------------------------------------------
def _allocation_of(run_dir: Path):
    """The run's allocation (allocation.csv) as an AllocationLike, or None for a dense run."""
    import csv
    from types import SimpleNamespace

    path = run_dir / "allocation.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    truth = {"True": True, "False": False, "true": True, "false": False, "1": True, "0": False}
    return SimpleNamespace(ranks={r["name"]: int(r["rank"]) for r in rows},
                           factored={r["name"]: truth.get(r["factored"], False) for r in rows},
                           lrc={r["name"]: truth.get(r["lrc"], False) for r in rows})


@dataclass
class PreparedRun:
    """A run's model ready to export (`prepare`); export it in several formats with `export_prepared`."""

    tokenizer: Any
    model: nn.Module
    record: dict  # the export record's run fields
    rank_map: dict


def prepare(run: str | os.PathLike, results: str | os.PathLike | None = None) -> PreparedRun:
    """The model finetune run `run` (directory, key, key prefix or kind/key) evaluated: trained tensors, LoRA merged
    (`merge_for_eval`), and any NF4 (4-bit) weights dequantised."""
    from deftlab.adapters import merge_for_eval
    from deftlab.adapters.checkpoint import rank_map_of
    from deftlab.recipes.finetune import load_finetuned
    from deftlab.store import read_record

    run_dir = resolve_run(run, results)
    rec = read_record(run_dir)
    lm, model = load_finetuned(run_dir, merge=False)  # raises for a run that is not a finetune run
    quantized = sum(1 for m in model.modules() if is_4bit(m))  # before the merge dequantises LoRA targets
    model = merge_for_eval(model)
    dequantize_4bit_linears(model)
    model.eval().requires_grad_(False)
    metrics, params = rec.get("metrics") or {}, rec.get("params") or {}
    n = count_params(model)["total"]
    if metrics.get("params") is not None and n != metrics["params"]:
        # the run's #Params counts this same merged model: a mismatch means the rebuild differs from the run
        raise DeftlabError(f"the rebuilt model has {n} parameters, the run recorded {metrics['params']}",
                           "the code changed since the run; re-run it")
    record = {
        "run": f"{rec.get('kind')}/{rec.get('key')}",
        "run_dir": str(run_dir.resolve()),
        "model": metrics.get("model") or params.get("model"),
        "method": metrics.get("method") or params.get("method"),
        "adapter": metrics.get("adapter") or params.get("adapter"),
        "run_params": metrics.get("params"),
        "dequantised": quantized > 0,
        "dequantised_modules": quantized,
    }
    if quantized:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        record["note"] = (f"{quantized} NF4 (4-bit) linears were dequantised to {dtype}: the export holds the "
                          "values the run computed with, at float size")
    return PreparedRun(lm.tokenizer, model, record, rank_map_of(model, _allocation_of(run_dir)))


def export_prepared(prep: PreparedRun, fmt: Format, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Export a prepared run; "merged" multiplies the factors back in place, so export "factored" first."""
    if fmt == "factored" and prep.record.get("factors_multiplied"):
        raise DeftlabError("this prepared run was exported merged already (its factors are multiplied back)",
                           "export factored first, or prepare the run again")
    record = {**prep.record, "rank_map": prep.rank_map}
    record.pop("factors_multiplied", None)
    out = export_model(prep.model, out_dir, fmt, tokenizer=prep.tokenizer, rank_map=prep.rank_map, record=record,
                       overwrite=overwrite)
    if fmt == "merged":
        prep.record["factors_multiplied"] = True
    return out


def export_run(run: str | os.PathLike, fmt: Format, out_dir: str | os.PathLike, *,
               results: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Export finetune run `run` (directory, key, key prefix or kind/key) to `out_dir`; returns the export record."""
    if fmt not in FORMATS:
        raise DeftlabError(f"unknown export format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    return export_prepared(prepare(run, results), fmt, out_dir, overwrite=overwrite)
