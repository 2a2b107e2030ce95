"""`deftlab decompose --shard`: processes started side by side (by hand, or by torchrun with --shard auto) fill one
decomposition cache together, with the same entries a single process writes; a run afterwards finds them all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deftlab.cli import main
from deftlab.config import ConfigError
from deftlab.commands.decompose import parse_shard

REPO = Path(__file__).resolve().parents[2]
ARGS = ["decompose", "--model", "tiny", "--keep", "0.6", "--calib-n", "16", "--ppl", "calib", "--ppl-max-tokens",
        "256"]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env(cache: Path, data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(DEFTLAB_CACHE=str(cache), DEFTLAB_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def _entries(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    (d,) = [p for p in (cache / "decompositions").iterdir() if p.is_dir()]
    index = json.loads((d / "index.json").read_text())["entries"]
    files = {p.name: p for p in d.glob("*.safetensors")}
    assert len(files) == len(index)
    from deftlab.decompose.cache import DecompositionCache

    c = DecompositionCache(d.name, root=d.parent)
    return {n: c.get(n).to_tensors()[0] for n in index}


def _same(a, b):
    assert sorted(a) == sorted(b) and len(a) == 14  # 7 targets × 2 blocks
    for n in a:
        assert all(torch.equal(a[n][k], b[n][k]) for k in ("U", "sigma", "Vt_Sinv")), n


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from tests.conftest import real_data_dir

    data = real_data_dir()
    if data is None:
        pytest.skip("real data directory not available")
    cache = tmp_path_factory.mktemp("single")
    out = subprocess.run([sys.executable, "-m", "deftlab", *ARGS, "--shard", "0/1"], env=_env(cache, data),
                         cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return data, _entries(cache)


@pytest.mark.parametrize("blockwise", [False, True], ids=["whole-model", "blockwise"])
def test_two_shards_side_by_side_fill_the_single_process_cache(single, tmp_path, blockwise):
    data, ref = single
    extra = ["--blockwise"] if blockwise else []
    procs = [subprocess.Popen([sys.executable, "-m", "deftlab", *ARGS, *extra, "--shard", f"{i}/2"],
                              env=_env(tmp_path, data), cwd=str(REPO), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sorted(int(o.split(": ")[1].split()[0]) for o, _ in outs) == [4, 10]  # whole Gram groups: q/k/v + gate/up, o + down
    _same(ref, _entries(tmp_path))


def test_torchrun_shard_auto_and_a_sharded_run(single, tmp_path):
    """Under torchrun, --shard auto takes each rank's part; and a plain run under torchrun shares the work too:
    each rank decomposes its part and reads the others' from the cache."""
    data, ref = single
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "deftlab", *ARGS, "--shard", "auto"], env=_env(tmp_path / "auto", data),
                         cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _same(ref, _entries(tmp_path / "auto"))

    from deftlab.decompose.config import DecompositionConfig
    from deftlab.models.loading import load_model
    from deftlab.recipes.compress import compress_model

    script = tmp_path / "job.py"
    script.write_text(
        "import json, os\nfrom pathlib import Path\nfrom deftlab.decompose.config import DecompositionConfig\n"
        "from deftlab.models.loading import load_model\nfrom deftlab.recipes.compress import compress_model\n"
        "m, r = compress_model(DecompositionConfig(keep=0.6, calib_n=16), load_model('tiny'),\n"
        "                      cache_root=Path(os.environ['DEFTLAB_CACHE']))\n"
        "from deftlab.decompose.whiten import svd_counter\n"
        "print('RANKS', json.dumps(r['allocation'].ranks, sort_keys=True))\nprint('SVDS', svd_counter.count)\n")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env=_env(tmp_path / "run", data), cwd=str(REPO), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("RANKS")]
    os.environ["DEFTLAB_DATA_DIR"] = str(data)
    _, solo = compress_model(DecompositionConfig(keep=0.6, calib_n=16), load_model("tiny"), cache_root=tmp_path / "s")
    assert len(ranks) == 2 and ranks[0] == ranks[1] == solo["allocation"].ranks
    svds = sorted(int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("SVDS"))
    assert svds == [4, 10]  # each rank decomposed only its part
    _same(ref, _entries(tmp_path / "run"))


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "-1/3"])
def test_a_bad_shard_says_how_to_write_one(bad):
    with pytest.raises(ConfigError, match="I/N"):
        parse_shard(bad)


def test_shard_auto_outside_torchrun(monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        parse_shard("auto")
    assert main is not None


@pytest.mark.parametrize("flags, what", [(["--allocator", "wanda"], "Wanda"),
                                         (["--allocator", "asvd", "--svd", "asvd"], "ASVD")])
def test_passes_without_shared_svds_refuse_a_shard(flags, what, capsys):
    # refused before the model loads: nothing would be split, and a sharded cache of plain SVDs would be misread
    assert main([*ARGS, *flags, "--shard", "0/2"]) == 2
    err = capsys.readouterr().err
    assert what in err and "without --shard" in err
