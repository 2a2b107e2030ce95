"""deftlab info: resolved model, data and cache locations, library versions."""

from __future__ import annotations

from deftlab import settings
from deftlab.commands._args import add_common_model_args
from deftlab.manifest import git_commit, hardware, package_versions
from deftlab.models.registry import model_specs
from deftlab.paths import configs_dir, experiments_dir


def add_parser(sub, name):
    p = sub.add_parser(name, help="show resolved locations, models and library versions",
                       description="Print the resolved model, data, cache and results locations and versions.")
    add_common_model_args(p)
    return p


def run(args) -> int:
    from deftlab.models.loading import resolve_spec

    spec = resolve_spec(args.model)
    data = settings.data_dir(args.data_dir)
    print(f"model        {spec.name}  [{spec.source}] {spec.hub_id or spec.path or ''}")
    if spec.source == "gguf_package":
        from deftlab.models.loading import _gguf_checkpoint_dir, checkpoint_is_valid, gguf_path

        g = gguf_path(spec)
        ckpt = _gguf_checkpoint_dir(spec, g)
        state = checkpoint_is_valid(ckpt)[1] if ckpt.exists() else "not converted yet (first load converts it)"
        print(f"  gguf       {g}")
        print(f"  checkpoint {ckpt}  ({state})")
    print(f"data dir     {data if data else '(not set: DEFTLAB_DATA_DIR / --data-dir; hub or generated data used)'}"
          + ("" if data is None or data.is_dir() else "  [MISSING]"))
    print(f"cache dir    {settings.cache_dir()}")
    print(f"results dir  {settings.results_dir()}")
    print(f"configs      {configs_dir()}")
    print(f"experiments  {experiments_dir()}")
    print(f"hub offline  {settings.hub_offline()}")
    print(f"git commit   {git_commit()}")
    print("models       " + ", ".join(sorted(model_specs())))
    hw = hardware()
    print(f"hardware     {hw.get('platform')}, {hw.get('cpu_count')} CPUs, gpu={hw.get('gpu', 'none')}")
    for name, ver in package_versions().items():
        print(f"  {name:18s} {ver or '-'}")
    return 0
