"""The embedded default model: conversion cache, corruption handling, pinned perplexity."""

import shutil
import time

import pytest

from deftlab.eval.corpora import corpus_text
from deftlab.eval.perplexity import perplexity, tokenize_corpus
from deftlab.models import get_spec, load_model
from deftlab.models.loading import WEIGHTS, _gguf_checkpoint_dir, checkpoint_is_valid, ensure_checkpoint, gguf_path

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm():
    ensure_checkpoint(get_spec("smollm2-135m"))  # first conversion (if any) is not what we time
    t0 = time.time()
    lm = load_model("smollm2-135m")
    lm.load_seconds = time.time() - t0
    return lm


def test_cached_load_is_fast_and_complete(smollm):
    assert smollm.load_seconds < 10
    assert smollm.num_params == 134_515_008
    assert type(smollm.model).__name__ == "LlamaForCausalLM"


def test_pinned_wikitext2_prefix_perplexity(smollm, data_dir):
    ids = tokenize_corpus(smollm.tokenizer, corpus_text("wikitext2", data_dir))
    assert ids.numel() == 304_986
    r = perplexity(smollm.model, ids, seqlen=1024, max_tokens=1024, progress=False)
    # measured once on this setup (fp32 CPU, transformers 5.23); guards the loader and tokenizer conversion
    assert r.ppl == pytest.approx(14.0850, rel=2e-3)


def test_corrupt_and_partial_checkpoints_are_detected_and_rebuilt(smollm, tmp_cache):
    spec = get_spec("smollm2-135m")
    src = smollm.checkpoint_dir
    dst = _gguf_checkpoint_dir(spec, gguf_path(spec))  # inside the empty tmp cache
    shutil.copytree(src, dst)
    assert checkpoint_is_valid(dst)[0]
    w = dst / WEIGHTS
    with open(w, "r+b") as f:  # flip bytes in the middle: same size, different content
        f.seek(w.stat().st_size // 2)
        f.write(b"\xff" * 64)
    ok, why = checkpoint_is_valid(dst)
    assert not ok and "checksum" in why
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size - 1000)
    ok, why = checkpoint_is_valid(dst)
    assert not ok and "partial" in why
    rebuilt = ensure_checkpoint(spec)  # converts again from the GGUF
    assert rebuilt == dst and checkpoint_is_valid(dst)[0]


def test_block_sequential_calibration_equals_the_whole_model_pass(smollm, data_dir):
    """SmolLM2-135M, 16 padded WikiText-2 passages: Grams within 1e-6 relative, identical α, whether the blocks
    come from the loaded model or are read one at a time from its safetensors checkpoint into a meta skeleton."""
    from deftlab.decompose.blockwise import ShardReader, collect_statistics_blockwise, skeleton_from_checkpoint
    from deftlab.decompose.calibration import collect_statistics, token_batches

    text = corpus_text("wikitext2", data_dir)
    texts = [text[i * 700: i * 700 + 200 + 31 * i] for i in range(16)]  # unequal lengths: padded batches
    batches = list(token_batches(smollm.tokenizer, texts, batch_size=4, max_length=128))
    whole = collect_statistics(smollm.model, batches, progress=False)
    skeleton = skeleton_from_checkpoint(smollm.checkpoint_dir)
    for stats in (collect_statistics_blockwise(smollm.model, batches, progress=False),
                  collect_statistics_blockwise(skeleton, batches, reader=ShardReader(smollm.checkpoint_dir),
                                               progress=False)):
        assert stats.tokens == whole.tokens and stats.alpha == whole.alpha
        for k, g in whole.grams.items():
            assert float((g - stats.grams[k]).abs().max() / g.abs().max()) <= 1e-6, k
