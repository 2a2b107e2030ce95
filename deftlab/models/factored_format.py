"""The factored export format (`deftlab export --format factored`): config.json of model type "deftlab_factored"
whose auto_map points at a bundled modeling file (modeling_factored.py, written as modeling_deftlab.py with its
base-architecture import filled in), and loading such a directory back.

Loading runs the directory's modeling file (trust_remote_code) only after checking it is exactly the file this
deftlab writes for those transformers classes, so no other code from the directory is executed."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from deftlab.errors import DeftlabError

FACTORED_EXPORT_TYPE = "deftlab_factored"
MODELING_FILE = "modeling_deftlab.py"
RECORD_FILE = "deftlab_export.json"
_BUNDLED = Path(__file__).with_name("modeling_factored.py")
_BASE_IMPORT = re.compile(r"^from transformers import \w+ as _BaseConfig, .*$", re.M)
_BASE_NAMES = re.compile(
    r"^from transformers import (\w+) as _BaseConfig, (\w+) as _BaseForCausalLM, (\w+) as _BaseModel$", re.M)


def modeling_source_for(names: tuple[str, ...]) -> str:
    """The bundled modeling file importing (config, causal LM, base model) classes `names` from transformers."""
    import transformers

    missing = [n for n in names if not hasattr(transformers, n)]
    if missing:
        raise DeftlabError(f"transformers exports no {missing[0]}: the factored format needs an HF architecture",
                           "use --format merged")
    line = f"from transformers import {names[0]} as _BaseConfig, {names[1]} as _BaseForCausalLM, " \
           f"{names[2]} as _BaseModel"
    source, n = _BASE_IMPORT.subn(line, _BUNDLED.read_text(), count=1)
    if n != 1:
        raise DeftlabError(f"{_BUNDLED} lost its base-architecture import line", "restore it")
    return source


def is_factored_export(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a factored export."""
    try:
        config = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == FACTORED_EXPORT_TYPE


def export_record(path: str | os.PathLike) -> dict:
    """An export directory's deftlab_export.json ({} when absent or unreadable)."""
    try:
        rec = json.loads((Path(path).expanduser() / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def load_factored(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model in eval mode, tokenizer or None) of a factored export at its own parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(path).expanduser()
    code = d / MODELING_FILE
    text = code.read_text() if code.is_file() else ""
    names = _BASE_NAMES.search(text)
    if not names or text != modeling_source_for(names.groups()):
        raise DeftlabError(f"{code} is not the modeling file this deftlab writes (missing, edited, or from another "
                           "version)", "re-export the run with this deftlab, or read the file and load the directory "
                           "yourself with trust_remote_code=True")
    model = AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=True, dtype=dtype).to(device).eval()
    tokenizer = None
    tok_config = d / "tokenizer_config.json"
    if tok_config.is_file():  # absent: exported without a Hugging Face tokenizer (the record says why)
        if "auto_map" in json.loads(tok_config.read_text()):
            raise DeftlabError(f"{tok_config} names custom tokenizer code, which deftlab does not write",
                               "re-export the run with this deftlab")
        # the flag only lets the tokenizer read config.json's checked auto_map (without it, transformers prompts)
        tokenizer = AutoTokenizer.from_pretrained(str(d), trust_remote_code=True)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
