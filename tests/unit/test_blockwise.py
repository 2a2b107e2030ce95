"""Block-sequential calibration gives the whole-model pass's statistics: from an in-memory model and from a
checkpoint read block by block into a meta skeleton (single-file and sharded safetensors)."""

import pytest
import torch

from deftlab.decompose.blockwise import ShardReader, collect_statistics_blockwise, skeleton_from_checkpoint
from deftlab.decompose.calibration import collect_statistics
from deftlab.errors import DeftlabError
from deftlab.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_hidden_layers=3)


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        ids = torch.randint(3, 128, (4, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 18:] = 0  # padding: excluded from the Grams and α in both passes
        mask[3, 10:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def whole(model, batches):
    return collect_statistics(model, batches, progress=False)


def _assert_same(a, b):
    assert a.tokens == b.tokens and a.gram_of == b.gram_of and sorted(a.grams) == sorted(b.grams)
    for k, g in a.grams.items():
        assert float((g - b.grams[k]).abs().max() / g.abs().max()) <= 1e-6, k
    assert a.alpha == b.alpha


def test_in_memory_blocks_give_the_whole_model_statistics(model, batches, whole):
    _assert_same(whole, collect_statistics_blockwise(model, batches, progress=False))
    assert len(whole.grams) == 3 * 4  # q/k/v and gate/up share: 4 Grams per block


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_blocks_read_from_the_checkpoint_give_the_same_statistics(model, batches, whole, tmp_path, shard):
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **kw)
    reader = ShardReader(tmp_path)
    assert shard is None or len(set(reader.where.values())) > 1  # really sharded
    skeleton = skeleton_from_checkpoint(tmp_path)
    assert all(p.is_meta for p in skeleton.parameters())
    _assert_same(whole, collect_statistics_blockwise(skeleton, batches, reader=reader, progress=False))
    assert all(p.is_meta for p in skeleton.parameters())  # every block handed back


def test_each_block_is_handed_over_and_dropped(model, batches, whole):
    seen = []
    stats = collect_statistics_blockwise(model, batches, keep_grams=False, progress=False,
                                         on_block=lambda i, st: seen.append((i, st)))
    assert [i for i, _ in seen] == [0, 1, 2]
    block = seen[1][1]
    assert sorted(block.gram_of) == sorted(n for n in whole.gram_of if ".layers.1." in n)  # the block's 7 linears
    assert all(torch.equal(block.gram(n), whole.gram(n)) for n in block.gram_of)
    assert stats.grams == {} and stats.alpha == whole.alpha


def test_a_meta_model_needs_a_reader(model, batches, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(DeftlabError, match="no weights"):
        collect_statistics_blockwise(skeleton_from_checkpoint(tmp_path), batches, progress=False)
    with pytest.raises(DeftlabError, match="model.safetensors"):
        ShardReader(tmp_path / "nowhere")
