"""`deftlab export`: tiny dense / DeFT+LoRA / WeLore LRC / DeFT+QLoRA runs exported factored and merged, reloaded in a
fresh process that cannot import deftlab, give the in-memory model's logits; the factored export has the run's
#Params."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deftlab.errors import DeftlabError
from deftlab.export import FORMATS, MODELING_FILE, RECORD_FILE, export_model, export_run
from deftlab.models.factored_format import _BUNDLED

TINY = dict(model="tiny", task="generated", profile="smoke", device="cpu", max_steps=2, eval_limit=1)
DECOMP = dict(calib_n=8, calib_max_length=64, group=4)
RUNS = {
    "dense_lora": dict(method="dense", adapter="lora", **TINY),
    "deft_lora": dict(method="deft", keep=0.8, lr=1e-2, **TINY, **DECOMP),
    "welore_lrc": dict(method="welore", adapter="lrc", err=0.45, welore_factor="lrc",  # LRCs factored, N-LRCs dense
                       lr=1e-3, **TINY, **DECOMP),
    "deft_qlora": dict(method="deft", adapter="qlora", keep=0.8, lr=1e-2, **TINY, **DECOMP),  # NF4 factors
}
TOKENS = [[1, 40, 17, 3, 99, 12, 5, 64, 2, 33, 90, 7], [1, 8, 9, 10, 11, 100, 101, 50, 51, 52, 53, 2]]
MAX_REL_ERR = 1e-5

# Runs in a fresh interpreter with deftlab blocked: loads each export with transformers alone and saves its logits.
RELOAD = r"""
import json, sys
class _NoDeftlab:  # an export must load without deftlab: fail loudly if anything imports it
    def find_spec(self, name, path=None, target=None):
        if name == "deftlab" or name.startswith("deftlab."):
            raise ImportError("an export imported deftlab")
sys.meta_path.insert(0, _NoDeftlab())
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
torch.set_num_threads(int(sys.argv[3]))  # the caller's: same kernels, same summation order
report = {}
for job in jobs:
    kw = dict(trust_remote_code=job["remote"], dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(job["dir"], **kw).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(job["tokens"])).logits
    save_file({"logits": logits.contiguous()}, job["out"])
    rep = report[job["dir"]] = {"params": sum(p.numel() for p in model.parameters()), "class": type(model).__name__}
    del model
    if job.get("base", True):
        rep["base_class"] = type(AutoModel.from_pretrained(job["dir"], **kw)).__name__
    if job.get("text") is not None:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(job["dir"], trust_remote_code=job["remote"])
        rep["text_ids"] = tok(job["text"])["input_ids"]
report["deftlab_imported"] = any(m == "deftlab" or m.startswith("deftlab.") for m in sys.modules)
json.dump(report, open(sys.argv[2], "w"))
"""


def reload_in_fresh_process(jobs: list[dict], tmp: Path, timeout: float = 600) -> dict:
    """jobs: {dir, remote, tokens, out[, base, text]}; runs RELOAD with cwd=tmp, no PYTHONPATH, offline, and a
    private modules cache; returns its report."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    report = tmp / "reload_report.json"
    argv = [sys.executable, "-c", RELOAD, json.dumps(jobs), str(report), str(torch.get_num_threads())]
    proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def memory_logits(model, tokens) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every run trained, exported in both formats and reloaded in one fresh process; the in-memory logits."""
    from deftlab.experiments.runner import execute, make_spec
    from deftlab.recipes.finetune import load_finetuned
    from deftlab.store import ResultsStore

    root = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.setenv("DEFTLAB_CACHE", str(root / "cache"))
    mp.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = ResultsStore(root / "results")
    out: dict = {"root": root, "store": store, "runs": {}, "exports": {}}
    jobs = []
    try:
        for name, params in RUNS.items():
            spec = make_spec("finetune", params)
            rec = execute(spec, store, options={"progress": False, "wandb_mode": "disabled"})
            run_dir = store.run_dir(spec.kind, spec.key)
            _, model = load_finetuned(run_dir, merge=True)  # deftlab's evaluated model
            out["runs"][name] = {"record": rec, "dir": run_dir, "logits": memory_logits(model, TOKENS)}
            for fmt in FORMATS:
                d = root / "exports" / f"{name}-{fmt}"
                ref = str(run_dir) if fmt == "factored" else spec.ref  # both ways of naming a run
                out["exports"][name, fmt] = export_run(ref, fmt, d, results=store.root)
                jobs.append({"dir": str(d), "remote": fmt == "factored", "tokens": TOKENS,
                             "out": str(root / f"{name}-{fmt}.logits.safetensors")})
        out["reload"] = reload_in_fresh_process(jobs, root)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(RUNS))
def test_reloaded_export_matches_in_memory_model(exported, name, fmt):
    from safetensors.torch import load_file

    run, rec = exported["runs"][name], exported["exports"][name, fmt]
    d = exported["root"] / "exports" / f"{name}-{fmt}"
    got = load_file(str(exported["root"] / f"{name}-{fmt}.logits.safetensors"))["logits"]
    err = rel_err(got, run["logits"])
    assert err <= MAX_REL_ERR, (name, fmt, err)
    reload = exported["reload"][str(d)]
    metrics = run["record"]["metrics"]
    if fmt == "factored":
        assert reload["params"] == rec["params"] == metrics["params"]  # the run's #Params
        assert reload["class"] == "DeftlabFactoredForCausalLM" and reload["base_class"] == "DeftlabFactoredModel"
    else:
        assert reload["params"] == rec["params"] == metrics["params_dense"]
        assert reload["class"] == "LlamaForCausalLM" and not (d / MODELING_FILE).exists()
        assert "auto_map" not in json.loads((d / "config.json").read_text())
    assert exported["reload"]["deftlab_imported"] is False


def test_export_records_ranks_sizes_and_dequantisation(exported):
    for (name, fmt), rec in exported["exports"].items():
        d = exported["root"] / "exports" / f"{name}-{fmt}"
        on_disk = json.loads((d / RECORD_FILE).read_text())
        assert on_disk == rec and rec["export_format"] == fmt and rec["run"].startswith("finetune/")
        assert rec["dequantised"] is (name == "deft_qlora") and ("note" in rec) is rec["dequantised"]
        assert rec["bytes"] == sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name != RECORD_FILE)
        assert rec["weights_bytes"] >= 4 * rec["params"]  # fp32, the tied LM head stored once
        assert rec["weights_bytes"] < 4 * rec["params"] + 64 * 1024
        assert {"torch", "transformers", "safetensors", "deftlab"} <= set(rec["packages"])
        assert (d / "generation_config.json").is_file()
        assert rec["tokenizer"].startswith("TinyTokenizer is not a Hugging Face tokenizer")
        if fmt == "factored":
            config = json.loads((d / "config.json").read_text())
            assert config["model_type"] == "deftlab_factored" and config["base_model_type"] == "llama"
            assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deftlab.DeftlabFactoredForCausalLM"
            assert config["auto_map"]["AutoModel"] == "modeling_deftlab.DeftlabFactoredModel"
            # the ranks are the rank map's factored entries (deftlab.adapters.checkpoint's format)
            rank_map = json.loads((d / "rank_map.json").read_text())
            assert config["factored_ranks"] == rec["factored_ranks"] == {
                n: e["rank"] for n, e in rank_map["modules"].items() if e["factored"]}
            assert bool(config["factored_ranks"]) is (not name.startswith("dense"))
    # WeLore: LRC matrices are factored, N-LRC ones dense at reduced rank (kept dense, listed in the rank map)
    welore = exported["exports"]["welore_lrc", "factored"]["rank_map"]["modules"]
    assert any(e["lrc"] and e["factored"] for e in welore.values())
    assert any(not e["factored"] and e["rank"] < e["full_rank"] for e in welore.values())
    # DeFT's factored export is smaller than its merged one; a dense run's two exports hold the same weights
    deft, dense = (tuple(exported["exports"][n, f]["weights_bytes"] for f in FORMATS)
                   for n in ("deft_lora", "dense_lora"))
    assert deft[0] < 0.85 * deft[1] and dense[0] == dense[1]


def test_bundled_modeling_file_does_not_import_deftlab(exported):
    for path in [_BUNDLED] + sorted((exported["root"] / "exports").glob(f"*/{MODELING_FILE}")):
        assert not re.search(r"^\s*(from|import)\s+deftlab\b", path.read_text(), re.M), path


def test_cli_export_and_refusals(exported, capsys, tmp_path):
    from deftlab.cli import main

    store, rec = exported["store"], exported["runs"]["deft_lora"]["record"]
    out = tmp_path / "cli"
    assert main(["export", rec["key"][:8], "--format", "merged", str(out), "--results", str(store.root)]) == 0
    assert "merged" in capsys.readouterr().out and (out / "model.safetensors").is_file()
    # a non-empty DIR is kept unless --force
    assert main(["export", rec["key"], "--format", "factored", str(out), "--results", str(store.root)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", rec["key"], "--format", "factored", str(out), "--results", str(store.root),
                 "--force"]) == 0
    assert json.loads((out / RECORD_FILE).read_text())["export_format"] == "factored"
    assert not list(tmp_path.glob(".cli.tmp*"))  # the temporary directory was renamed into place
    assert main(["export", "0000ffff", "--format", "merged", str(tmp_path / "x"), "--results", str(store.root)]) == 2
    with pytest.raises(DeftlabError, match="unknown export format"):
        export_run(str(exported["runs"]["deft_lora"]["dir"]), "gguf", tmp_path / "y")


def test_other_architecture_with_biased_factors_round_trips(tmp_path):
    """The bundled file takes the exported model's own classes (Qwen2 here: q/k/v biases land in u_proj)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from deftlab.surgery.lowrank import LowRankLinear

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            parent, _, attr = name.rpartition(".")
            lin = model.get_submodule(name)
            lin.bias is None or lin.bias.normal_()
            U, S, Vh = torch.linalg.svd(lin.weight, full_matrices=False)
            k = 16
            setattr(model.get_submodule(parent), attr,
                    LowRankLinear.from_factors(U[:, :k] * S[:k], Vh[:k].contiguous(), lin.bias, requires_grad=False))
    want = memory_logits(model, TOKENS)
    n = sum(p.numel() for p in model.parameters())
    recs = {fmt: export_model(model, tmp_path / fmt, fmt) for fmt in ("factored", "merged")}  # merged: last
    assert recs["factored"]["params"] == n and recs["factored"]["factored_ranks"] == {
        "model.layers.0.self_attn.q_proj": 16, "model.layers.1.mlp.down_proj": 16}
    assert "from transformers import Qwen2Config as _BaseConfig" in (tmp_path / "factored" / MODELING_FILE).read_text()
    jobs = [{"dir": str(tmp_path / fmt), "remote": fmt == "factored", "tokens": TOKENS,
             "out": str(tmp_path / f"{fmt}.safetensors")} for fmt in recs]
    report = reload_in_fresh_process(jobs, tmp_path)
    from safetensors.torch import load_file

    for fmt in recs:
        err = rel_err(load_file(str(tmp_path / f"{fmt}.safetensors"))["logits"], want)
        assert err <= MAX_REL_ERR, (fmt, err)
    assert report[str(tmp_path / "factored")]["params"] == n
    assert report[str(tmp_path / "merged")]["class"] == "Qwen2ForCausalLM"


def test_factored_exports_load_back_into_deftlab_and_eval_lm(exported, tmp_path):
    """deftlab reads its own factored exports (eval-lm's MODEL), runs their modeling file only when it is exactly
    the one this deftlab writes, and refuses them where a dense model is needed, with one line each."""
    import shutil

    from deftlab.models import load_model
    from deftlab.models.factored_format import is_factored_export, load_factored
    from deftlab.recipes.lm_eval_run import LmEvalConfig, load_source

    for name, run in exported["runs"].items():
        d = exported["root"] / "exports" / f"{name}-factored"
        assert is_factored_export(d) and not is_factored_export(d.with_name(f"{name}-merged"))
        model, tokenizer = load_factored(d)
        assert tokenizer is None  # the tiny model's tokenizer is not a Hugging Face one (the record says so)
        assert sum(p.numel() for p in model.parameters()) == run["record"]["metrics"]["params"]
        assert rel_err(memory_logits(model, TOKENS), run["logits"]) <= MAX_REL_ERR, name
    d = exported["root"] / "exports" / "deft_lora-factored"
    model, _, source = load_source(LmEvalConfig.from_params({"model": str(d)}).resolve())
    assert source["source_kind"] == "export" and source["source_model"] == "tiny"
    assert sum(p.numel() for p in model.parameters()) == exported["runs"]["deft_lora"]["record"]["metrics"]["params"]
    with pytest.raises(DeftlabError, match="factored deftlab export"):
        load_model(str(d))
    # an edited modeling file is refused before anything in it runs
    edited = tmp_path / "edited"
    shutil.copytree(d, edited)
    with open(edited / MODELING_FILE, "a") as f:
        f.write("\nraise RuntimeError('the edited file ran')\n")
    with pytest.raises(DeftlabError, match="not the modeling file this deftlab writes"):
        load_factored(edited)
    (edited / MODELING_FILE).unlink()
    with pytest.raises(DeftlabError, match="not the modeling file"):
        load_factored(edited)


def test_a_factored_export_with_a_tokenizer_loads_it_without_a_prompt(exported, tmp_path):
    """transformers' AutoTokenizer reads config.json's auto_map and would ask before running it; load_factored
    loads the tokenizer too (the modeling file checked), unless the tokenizer config names code of its own."""
    import shutil

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from deftlab.models.factored_format import load_factored

    d = tmp_path / "with-tokenizer"
    shutil.copytree(exported["root"] / "exports" / "deft_lora-factored", d)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "2": 3, "+": 4, "=": 5}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(str(d))
    _, loaded = load_factored(d)
    assert loaded is not None and loaded.convert_tokens_to_ids(["2", "+"]) == [3, 4] and loaded.pad_token == "</s>"
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["x.Tok", None]}}))
    with pytest.raises(DeftlabError, match="custom tokenizer code"):
        load_factored(d)
