"""Fine-tuning on the tiny model: loss masking, the smoke fine-tune, resume, presets, run records."""

from __future__ import annotations

import json
import warnings

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from deftlab.config import ConfigError
from deftlab.errors import DeftlabError, UnknownNameError
from deftlab.models.tiny import TinyTokenizer, tiny_llama
from deftlab.tasks import get_task
from deftlab.train.module import lr_factor, masked_lm_loss
from deftlab.train.profiles import TrainProfile, load_profile, profile_names
from deftlab.train.loggers import make_loggers
from deftlab.train.trainer import CKPT_DIR, FINAL_WEIGHTS, fit

# Loss of tiny_llama(seed 0) on the first smoke batch of generated arithmetic (computed once, torchtune-style).
EXPECTED_INITIAL_LOSS = 4.8979


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    return get_task("generated", n_train=64, n_test=8)


def _model(trainable=("q_proj", "v_proj")):
    """Tiny LLaMA with only some weights trainable (stands in for an adapter)."""
    m = tiny_llama(max_position_embeddings=512)
    for n, p in m.named_parameters():
        p.requires_grad = any(t in n for t in trainable)
    return m.train()


# --- loss -------------------------------------------------------------------------------------------------------
def test_masked_loss_counts_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 2], [-100, -100, 7, 2, -100, -100]])
    loss, n = masked_lm_loss(logits, labels)
    ref = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 2], logits[0, 3], logits[0, 4], logits[1, 1], logits[1, 2]]),
        torch.tensor([4, 5, 2, 7, 2]))
    assert n == 5 and torch.allclose(loss, ref)
    changed = logits.clone()
    changed[0, :2, 4] += 5.0  # positions predicting prompt tokens
    changed[1, 3:, 2] -= 3.0  # positions predicting padding
    assert torch.allclose(masked_lm_loss(changed, labels)[0], loss)
    changed[0, 3, 0] += 1.0  # a position predicting a response token
    assert not torch.allclose(masked_lm_loss(changed, labels)[0], loss)
    with pytest.raises(DeftlabError):
        masked_lm_loss(logits, torch.full_like(labels, -100))


def test_lr_schedules():
    kw = dict(warmup_steps=10, total_steps=110)
    assert lr_factor(0, **kw) == 0.0 and lr_factor(5, **kw) == 0.5 and lr_factor(10, **kw) == 1.0
    assert lr_factor(60, **kw) == pytest.approx(0.5) and lr_factor(110, **kw) == 0.0
    assert lr_factor(60, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(110, schedule="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_factor(100, schedule="constant", **kw) == 1.0


# --- smoke fine-tune ------------------------------------------------------------------------------------------------
def test_smoke_finetune_lowers_loss(task, tmp_path):
    model = _model(trainable=("",))  # everything trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = fit(model, TinyTokenizer(), task, load_profile("smoke"), tmp_path, loggers=False, progress=False)
    assert stats["global_step"] == 6 and stats["micro_batches"] == 12  # 6 steps × accumulation 2
    assert stats["initial_loss"] == pytest.approx(EXPECTED_INITIAL_LOSS, abs=2e-3)
    assert stats["final_loss"] < stats["initial_loss"] - 0.5
    assert stats["tokens_per_s"] > 0 and stats["peak_memory_bytes"] > 0 and stats["data"]["examples"] > 20
    assert not model.training  # handed back in eval mode
    saved = load_file(str(tmp_path / FINAL_WEIGHTS))
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    assert json.loads((tmp_path / "train_stats.json").read_text())["global_step"] == 6


def test_galore_optimizer_projects_decoder_matrices_and_lowers_loss(task, tmp_path):
    galore_torch = pytest.importorskip("galore_torch")
    from deftlab.train.module import GALORE

    model = _model(trainable=("",))
    seen = {}

    class Spy(pl.Callback):
        def on_train_start(self, trainer, module):
            groups = trainer.optimizers[0].param_groups
            seen["galore_adamw"] = isinstance(trainer.optimizers[0], galore_torch.GaLoreAdamW)
            seen["galore"] = [g for g in groups if "rank" in g]

    stats = fit(model, TinyTokenizer(), task, load_profile("smoke"), tmp_path, loggers=False, progress=False,
                callbacks=[Spy()], optimizer="galore")
    assert seen["galore_adamw"]
    (g,) = seen["galore"]
    assert g["rank"] == GALORE["rank"] and len(g["params"]) == 7 * len(model.model.layers)  # q k v o gate up down
    assert stats["final_loss"] < stats["initial_loss"] - 0.3


def test_frozen_weights_stay_frozen(task, tmp_path):
    model = _model()
    frozen = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    fit(model, TinyTokenizer(), task, load_profile("smoke", max_steps=2), tmp_path, loggers=False, progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, frozen)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)


def test_no_trainable_parameters_is_an_error(task, tmp_path):
    with pytest.raises(DeftlabError, match="no trainable parameters"):
        fit(_model(trainable=()), TinyTokenizer(), task, load_profile("smoke"), tmp_path, loggers=False,
            progress=False)


# --- resume ---------------------------------------------------------------------------------------------------
class _Interrupt(pl.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.at_step:
            raise RuntimeError("simulated crash")


def test_interrupted_run_resumes_from_checkpoint(task, tmp_path):
    # 2 epochs of 15 micro-batches (accumulation 2 → 8 steps/epoch); checkpoints every 3 steps, crash at step 10:
    # the resume point (step 9) lies inside epoch 2, so the data position must be restored too.
    preset = load_profile("smoke", max_steps=-1, epochs=2, save_every_n_steps=3)
    tok = TinyTokenizer()
    ref = fit(_model(), tok, task, preset, tmp_path / "ref", loggers=False, progress=False)

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(_model(), tok, task, preset, run, loggers=False, progress=False, callbacks=[_Interrupt(10)])
    ckpts = sorted(p.name for p in (run / CKPT_DIR).iterdir())
    assert ckpts == ["last-weights-step00000009.safetensors", "last.ckpt"]
    model = _model()
    weights = load_file(str(run / CKPT_DIR / ckpts[0]))
    assert set(weights) == {"model." + n for n, p in model.named_parameters() if p.requires_grad}  # trainable only
    assert len(weights) == 4  # q_proj and v_proj of 2 layers; the frozen base is not in the checkpoint

    stats = fit(model, tok, task, preset, run, loggers=False, progress=False)
    assert stats["resumed_from_step"] == 9 and stats["global_step"] == ref["global_step"] == 16
    a, b = load_file(str(tmp_path / "ref" / FINAL_WEIGHTS)), load_file(str(run / FINAL_WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same data order and optimizer state as the uninterrupted run

    again = fit(_model(), tok, task, preset, run, loggers=False, progress=False)  # finished: restores, no training
    assert again["resumed_from_step"] == 16 and again["global_step"] == 16


def test_resume_with_other_trainable_set_fails(task, tmp_path):
    preset = load_profile("smoke", max_steps=2)
    fit(_model(), TinyTokenizer(), task, preset, tmp_path, loggers=False, progress=False)
    with pytest.raises(DeftlabError, match="trainable tensors do not match"):
        fit(_model(trainable=("k_proj",)), TinyTokenizer(), task, load_profile("smoke", max_steps=4), tmp_path,
            loggers=False, progress=False)


# --- presets ----------------------------------------------------------------------------------------------------
def test_profiles_load_and_validate():
    assert set(profile_names()) >= {"paper", "gpu", "cpu-small", "smoke"}
    paper = load_profile("paper")
    assert (paper.lr, paper.batch_size, paper.lora_r, paper.lora_alpha, paper.epochs) == (3e-4, 16, 32, 16, 3)
    assert paper.betas == [0.9, 0.999] and paper.lr_grid == [1e-4, 3e-4, 5e-4] and paper.train_limit is None
    assert load_profile("gpu").precision == "bf16-mixed" and load_profile("cpu-small").precision == "32-true"
    cpu = load_profile("cpu-small")
    assert cpu.eval_limit == 50 and cpu.train_limit and cpu.accumulate_grad_batches == 4
    assert load_profile("smoke", lr=1e-3).lr == 1e-3
    from deftlab.adapters.config import AdapterConfig

    cfg = AdapterConfig(kind="lora", **paper.adapter_kwargs())
    assert (cfg.r, cfg.alpha, cfg.dropout) == (32, 16, 0.05) and "down_proj" in cfg.target_modules
    with pytest.raises(UnknownNameError, match="unknown training profile 'nope'"):
        load_profile("nope")
    with pytest.raises(ConfigError, match="multiple"):
        load_profile("smoke", batch_size=5)
    with pytest.raises(ConfigError, match="unknown key"):
        load_profile("smoke", learning_rate=1e-3)
    with pytest.raises(ConfigError):
        load_profile("smoke", precision="fp8")


# --- loggers ----------------------------------------------------------------------------------------------------
def test_loggers_fall_back_to_csv_when_wandb_fails(tmp_path, monkeypatch):
    import pytorch_lightning.loggers as L

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("no wandb here")

    monkeypatch.setattr(L, "WandbLogger", Broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = make_loggers(tmp_path, run_name="r")
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    assert any("W&B logging unavailable" in str(w.message) for w in caught)
    assert [type(lg).__name__ for lg in make_loggers(tmp_path, run_name="r", wandb_mode="disabled")] == ["CSVLogger"]


def test_train_preset_defaults_are_the_paper_recipe():
    p = TrainProfile()
    assert (p.lr, p.betas, p.batch_size, p.lora_r, p.lora_alpha, p.cutoff_len) == (3e-4, [0.9, 0.999], 16, 32, 16, 256)


def test_gradient_checkpointing_gives_the_same_losses(task, tmp_path):
    """Recomputing each layer in backward changes memory, not arithmetic: the same loss curve and trained weights."""
    runs = {}
    for ckpt in (False, True):
        model = _model()
        stats = fit(model, TinyTokenizer(), task, load_profile("smoke", max_steps=3, gradient_checkpointing=ckpt),
                    tmp_path / str(ckpt), loggers=False, progress=False)
        assert model.model.gradient_checkpointing is ckpt
        runs[ckpt] = ((stats["initial_loss"], stats["final_loss"]), load_file(str(tmp_path / str(ckpt) / FINAL_WEIGHTS)))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, t in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], t, rtol=1e-4, atol=1e-6)
    assert _model().model.gradient_checkpointing is False  # a fresh model is untouched


@pytest.mark.parametrize("name", ["paged_adamw", "adamw_8bit"])
def test_bitsandbytes_optimizers_train(task, tmp_path, name):
    import bitsandbytes as bnb

    from deftlab.train.module import BNB_OPTIMIZERS

    seen = {}

    class Spy(pl.Callback):
        def on_train_end(self, trainer, module):
            opt = trainer.optimizers[0]
            seen["cls"] = type(opt)
            seen["state_dtypes"] = {s["state1"].dtype for s in opt.state.values() if "state1" in s}

    model = _model(trainable=("",))
    stats = fit(model, TinyTokenizer(), task, load_profile("smoke"), tmp_path, loggers=False, progress=False,
                callbacks=[Spy()], optimizer=name)
    assert seen["cls"] is getattr(bnb.optim, BNB_OPTIMIZERS[name])
    # 8-bit states for tensors of ≥ 4096 entries (bitsandbytes' min_8bit_size): the 128×64 embedding
    assert (torch.uint8 in seen["state_dtypes"]) == name.endswith("8bit")
    assert stats["final_loss"] < stats["initial_loss"] - 0.3


def test_two_processes_give_one_processs_losses_and_weights(task, tmp_path):
    """DDP on CPU (gloo, ddp_spawn): 2 processes × 1 micro-batch per step make the same optimizer steps as 1
    process accumulating 2 micro-batches (the sampler hands the ranks that process's very batches), so the
    trained weights agree to float rounding (tolerance 1e-5 relative) after every step's update."""
    from deftlab.train.datamodule import SeededBatchSampler

    one = SeededBatchSampler(10, 2, seed=0)
    ranks = [list(SeededBatchSampler(10, 2, seed=0, rank=r, world=2)) for r in (0, 1)]
    assert [b for pair in zip(*ranks) for b in pair] == list(one)[:4]  # 5 batches: the odd one out is dropped
    runs = {}
    for devices in (1, 2):
        model = _model()
        stats = fit(model, TinyTokenizer(), task, load_profile("smoke", max_steps=3, devices=devices),
                    tmp_path / str(devices), loggers=False, progress=False)
        runs[devices] = (stats, load_file(str(tmp_path / str(devices) / FINAL_WEIGHTS)), model)
    s1, s2 = runs[1][0], runs[2][0]
    assert s2["world_size"] == 2 and s2["strategy"] == "ddp_spawn" and s2["accumulate_grad_batches"] == 1
    assert s1["global_step"] == s2["global_step"] == 3
    assert s2["train_tokens"] == s1["train_tokens"]  # both processes' tokens counted
    assert s2["micro_batches"] == s1["micro_batches"] // 2  # one loss per step: both processes' mean
    for name, t in runs[1][1].items():
        torch.testing.assert_close(runs[2][1][name], t, rtol=1e-5, atol=1e-7)
    # the launching process's model holds the trained weights (evaluation and records happen here)
    trained = dict(runs[2][2].named_parameters())
    for name, t in runs[1][1].items():
        torch.testing.assert_close(trained[name].detach(), t, rtol=1e-5, atol=1e-7)
