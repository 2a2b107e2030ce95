import subprocess
import sys
import time

import pytest

from deftlab.config import ConfigError, from_dict
from deftlab.errors import DeftlabError, UnknownNameError
from deftlab.models import load_model, model_specs
from deftlab.models.registry import ModelSpec


def test_registry_has_default_and_paper_models():
    specs = model_specs()
    assert specs["smollm2-135m"].source == "gguf_package"
    for name, hub in [("llama-7b", "huggyllama/llama-7b"), ("llama2-13b", "meta-llama/Llama-2-13b-hf"),
                      ("llama3-70b", "meta-llama/Meta-Llama-3-70B"), ("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
                      ("qwen3-32b", "Qwen/Qwen3-32B"), ("mistral-7b", "mistralai/Mistral-7B-v0.3"),
                      ("opt-6.7b", "facebook/opt-6.7b"), ("llama-65b", "huggyllama/llama-65b")]:
        assert specs[name].hub_id == hub


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UnknownNameError) as e:
        load_model("no-such-model")
    msg = str(e.value)
    assert "unknown model 'no-such-model'" in msg and "smollm2-135m" in msg and "\n" not in msg


def test_offline_hub_id_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty HF cache
    t0 = time.time()
    with pytest.raises(DeftlabError) as e:
        load_model("llama-7b")
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert "huggyllama/llama-7b" in msg and "network" in msg and "local model directory" in msg
    assert "\n" not in msg


def test_model_config_validation():
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ModelSpec, {"name": "x", "source": "hub", "hub_id": "a/b", "bogus": 1})
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(ModelSpec, {"name": "x", "source": "ftp"})
    with pytest.raises(DeftlabError, match="needs hub_id"):
        from_dict(ModelSpec, {"name": "x", "source": "hub"})


def test_tiny_model_loads_by_name():
    lm = load_model("tiny")
    assert lm.num_params == 94528 and lm.fingerprint == "tiny:seed0"


def test_cli_unknown_model_is_one_line():
    r = subprocess.run([sys.executable, "-m", "deftlab", "info", "--model", "nope"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown model 'nope'" in r.stderr


def test_cli_help_on_every_subcommand():
    from deftlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"info", "eval-ppl", "decompose", "demo"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.format_help().startswith("usage:"), name
