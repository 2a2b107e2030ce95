"""Run kinds: a kind name → the function that performs one run, imported only when a run needs it.

Contract for a run function (the other modules implement it):

    fn(params: dict, run_dir: pathlib.Path) -> dict   # metrics, JSON-serialisable

`run_dir` is an empty directory the function may fill with artifacts (per-matrix CSVs, adapter weights, ...);
it becomes results/<kind>/<key>/ only if the function returns. `params` are the run's fully resolved parameters.
A parameter that refers to another run (`{"ref": {"kind": ..., "params": {...}}}` in an experiment) arrives as
`{"ref": "<kind>/<key>", "dir": "<absolute run dir>", "params": {...}, "metrics": {...}}`; the runner has
recorded that run first.

Each kind also carries a cost model (seconds per run, by preset) for `deftlab run --dry-run`. The numbers are
rough planning estimates for one machine, not measurements; an experiment's YAML may override them.

A kind may add a *fingerprint* to its runs' keys: things a run depends on that are not in its params. The
training kinds take their hyper-parameters from configs/presets/<params["preset"]>.yaml, so the parsed content
of that file is part of their key: editing a preset makes its runs "missing" instead of silently stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
from typing import Callable

from deftlab.config import load_yaml

from deftlab.errors import DeftlabError, UnknownNameError

RunFunction = Callable[..., dict]


@dataclasses.dataclass
class Kind:
    name: str
    target: str | RunFunction  # "module:function" (imported lazily) or the function itself
    cost_s: dict[str, float] = dataclasses.field(default_factory=dict)  # preset -> seconds per run
    description: str = ""
    fingerprint: Callable[[dict], dict] | None = None  # params -> extra things hashed into the run key

    def resolve(self) -> RunFunction:
        if callable(self.target):
            return self.target
        module, _, func = self.target.partition(":")
        if not module or not func:
            raise DeftlabError(f"run kind '{self.name}' has a malformed target '{self.target}'",
                               "write it as 'package.module:function'")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                raise DeftlabError(f"run kind '{self.name}' needs {module}, which is not in this build",
                                   "install/update deftlab, or run another experiment") from e
            raise
        fn = getattr(mod, func, None)
        if not callable(fn):
            raise DeftlabError(f"run kind '{self.name}': {module} has no function '{func}'",
                               "update deftlab (the kind's module and the registry disagree)")
        return fn

    def cost(self, preset: str) -> float | None:
        return self.cost_s.get(preset)


def preset_fingerprint(params: dict) -> dict:
    """{"preset_config": hash of the parsed configs/presets/<preset>.yaml} when the run names a preset file."""
    from deftlab.experiments.store import canonical_json
    from deftlab.paths import configs_dir

    name = params.get("preset")
    if not isinstance(name, str):
        return {}
    path = configs_dir() / "presets" / f"{name}.yaml"
    if not path.is_file():
        return {}
    digest = hashlib.sha256(canonical_json(load_yaml(path)).encode()).hexdigest()[:12]
    return {"preset_config": f"{name}:{digest}"}


def toy_run(params: dict, run_dir) -> dict:
    """A deterministic stand-in run: metrics are smooth functions of the numeric params (for tests and demos).

    `score` rises with `keep` and `lora_r`, falls with `eta` distance from 0.5; `noise` varies with the seed.
    Set params["fail"] = true to make it raise (tests of the runner's failure path).
    """
    if params.get("fail"):
        raise RuntimeError("toy run asked to fail")
    keep = float(params.get("keep", 1.0))
    r = float(params.get("lora_r", 8))
    eta = float(params.get("eta", 0.5))
    seed = int(params.get("seed", 0))
    h = int(hashlib.sha256(str(seed).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    score = 50.0 * keep + 5.0 * math.log2(max(r, 1.0)) - 10.0 * (eta - 0.5) ** 2 + (h - 0.5)
    (run_dir / "toy.txt").write_text(f"score={score}\n")
    return {"score": score, "ppl": 10.0 / max(keep, 1e-3), "noise": h, "params_total": int(1000 * keep)}


BUILTIN: dict[str, Kind] = {
    "compress": Kind(
        "compress", "deftlab.decompose.pipeline:run_compress",
        cost_s={"smoke": 3, "cpu-small": 240, "gpu": 900, "paper": 3600},
        description="calibrate, decompose to a budget (DeFT/WeLore/OWL/uniform), evaluate perplexity"),
    "finetune": Kind(
        "finetune", "deftlab.train.pipeline:run_finetune",
        cost_s={"smoke": 6, "cpu-small": 1800, "gpu": 3 * 3600, "paper": 12 * 3600},
        description="(decompose, then) fine-tune with LoRA/QLoRA/LoftQ/full and evaluate on the task",
        fingerprint=preset_fingerprint),
    "osd": Kind(
        "osd", "deftlab.delta.experiment:run_osd",
        cost_s={"smoke": 2, "cpu-small": 120, "gpu": 600, "paper": 1800},
        description="compress a fine-tuned update with a codec at a byte budget; error and accuracy",
        fingerprint=preset_fingerprint),
    "efficiency": Kind(
        "efficiency", "deftlab.train.efficiency:run_efficiency",
        cost_s={"smoke": 3, "cpu-small": 300, "gpu": 600, "paper": 1800},
        description="training memory and throughput vs batch size",
        fingerprint=preset_fingerprint),
    "toy": Kind("toy", toy_run, cost_s={"smoke": 0.01, "cpu-small": 0.01, "gpu": 0.01, "paper": 0.01},
                description="synthetic metrics from the params (tests and demos only)"),
}

_KINDS: dict[str, Kind] = dict(BUILTIN)


def register_kind(name: str, target: str | RunFunction, cost_s: dict[str, float] | None = None,
                  description: str = "", replace: bool = False,
                  fingerprint: Callable[[dict], dict] | None = None) -> Kind:
    """Add a run kind at runtime (tests register toy kinds); re-registering needs replace=True."""
    if name in _KINDS and not replace:
        raise DeftlabError(f"run kind '{name}' is already registered", "pass replace=True to override it")
    kind = Kind(name, target, dict(cost_s or {}), description, fingerprint)
    _KINDS[name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a runtime kind (built-ins come back as they were)."""
    _KINDS.pop(name, None)
    if name in BUILTIN:
        _KINDS[name] = BUILTIN[name]


def get_kind(name: str) -> Kind:
    if name not in _KINDS:
        raise UnknownNameError("run kind", name, _KINDS)
    return _KINDS[name]


def known_kinds() -> list[str]:
    return sorted(_KINDS)
