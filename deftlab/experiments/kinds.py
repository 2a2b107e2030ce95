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
training kinds take their hyper-parameters from the training profile configs/profiles/<params["profile"]>.yaml,
so the parsed content of that file is part of their key: editing a profile makes its runs "missing" instead of
silently stale. A kind may also name a *config* function (params -> the resolved config the run will use), which
the store records beside the params; it runs before the run starts, so bad params fail before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
from pathlib import Path
from typing import Callable

from deftlab.errors import DeftlabError, UnknownNameError
from deftlab.store.lease import host_name
from deftlab.train.profiles import profile_fingerprint

RunFunction = Callable[..., dict]


@dataclasses.dataclass
class Kind:
    name: str
    target: str | RunFunction  # "module:function" (imported lazily) or the function itself
    cost_s: dict[str, float] = dataclasses.field(default_factory=dict)  # preset -> seconds per run
    description: str = ""
    fingerprint: Callable[[dict], dict] | None = None  # params -> extra things hashed into the run key
    config: str | Callable[[dict], dict] | None = None  # params -> resolved config ("module:function" or callable)

    def resolve(self) -> RunFunction:
        return self._load(self.target)

    def resolved_config(self, params: dict) -> dict | None:
        return self._load(self.config)(params) if self.config else None

    def _load(self, target) -> Callable:
        if callable(target):
            return target
        module, _, func = target.partition(":")
        if not module or not func:
            raise DeftlabError(f"run kind '{self.name}' has a malformed target '{target}'",
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


def toy_run(params: dict, run_dir) -> dict:
    """A deterministic stand-in run: metrics are smooth functions of the numeric params (for tests and demos).

    `score` rises with `keep` and `lora_r`, falls with `eta` distance from 0.5; `noise` varies with the seed.
    Set params["fail"] = true to make it raise (tests of the runner's failure path). `sleep_s` makes it take that
    long, like a training run: it first leaves `started.txt` in its directory, and an attempt that finds one (a
    run resumed in place) skips the wait and reports resumed = true. With env DEFTLAB_TOY_LOG set, each call
    appends "<host> <seed> <resumed>" to that file (tests count executions across processes).
    """
    import os
    import time

    if params.get("fail"):
        raise RuntimeError("toy run asked to fail")
    marker = Path(run_dir) / "started.txt"
    resumed = marker.is_file()
    marker.write_text("started\n")
    if params.get("sleep_s") and not resumed:
        time.sleep(float(params["sleep_s"]))
    keep = float(params.get("keep", 1.0))
    r = float(params.get("lora_r", 8))
    eta = float(params.get("eta", 0.5))
    seed = int(params.get("seed", 0))
    h = int(hashlib.sha256(str(seed).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    score = 50.0 * keep + 5.0 * math.log2(max(r, 1.0)) - 10.0 * (eta - 0.5) ** 2 + (h - 0.5)
    (Path(run_dir) / "toy.txt").write_text(f"score={score}\n")
    if os.environ.get("DEFTLAB_TOY_LOG"):
        with open(os.environ["DEFTLAB_TOY_LOG"], "a") as f:
            f.write(f"{host_name()} {seed} {resumed}\n")
    return {"score": score, "ppl": 10.0 / max(keep, 1e-3), "noise": h, "params_total": int(1000 * keep),
            "resumed": resumed}


BUILTIN: dict[str, Kind] = {
    "compress": Kind(
        "compress", "deftlab.recipes.compress:run_compress", config="deftlab.recipes.compress:resolved_config",
        cost_s={"smoke": 3, "cpu-small": 240, "gpu": 900, "paper": 3600},
        description="calibrate, decompose to a budget (DeFT/WeLore/OWL/uniform), evaluate perplexity"),
    "finetune": Kind(
        "finetune", "deftlab.recipes.finetune:run_finetune", config="deftlab.recipes.finetune:resolved_config",
        cost_s={"smoke": 6, "cpu-small": 1800, "gpu": 3 * 3600, "paper": 12 * 3600},
        description="(decompose, then) fine-tune with LoRA/QLoRA/LoftQ/full and evaluate on the task",
        fingerprint=profile_fingerprint),
    "osd": Kind(
        "osd", "deftlab.recipes.osd:run_osd", config="deftlab.recipes.osd:resolved_config",
        cost_s={"smoke": 2, "cpu-small": 120, "gpu": 600, "paper": 1800},
        description="compress a fine-tuned update with a codec at a byte budget; error and accuracy",
        fingerprint=profile_fingerprint),
    "efficiency": Kind(
        "efficiency", "deftlab.recipes.efficiency:run_efficiency", config="deftlab.recipes.efficiency:resolved_config",
        cost_s={"smoke": 3, "cpu-small": 300, "gpu": 600, "paper": 1800},
        description="training memory and throughput vs batch size",
        fingerprint=profile_fingerprint),
    "lm_eval": Kind(
        "lm_eval", "deftlab.recipes.lm_eval_run:run_lm_eval", config="deftlab.recipes.lm_eval_run:resolved_config",
        cost_s={"smoke": 30, "cpu-small": 1800, "gpu": 900, "paper": 3 * 3600},
        description="lm-evaluation-harness tasks (local deftlab_* sets, zeroshot7) on a model or a run's model"),
    "toy": Kind("toy", toy_run, cost_s={"smoke": 0.01, "cpu-small": 0.01, "gpu": 0.01, "paper": 0.01},
                description="synthetic metrics from the params (tests and demos only)"),
}

_KINDS: dict[str, Kind] = dict(BUILTIN)


def register_kind(name: str, target: str | RunFunction, cost_s: dict[str, float] | None = None,
                  description: str = "", replace: bool = False,
                  fingerprint: Callable[[dict], dict] | None = None, config=None) -> Kind:
    """Add a run kind at runtime (tests register toy kinds); re-registering needs replace=True."""
    if name in _KINDS and not replace:
        raise DeftlabError(f"run kind '{name}' is already registered", "pass replace=True to override it")
    kind = Kind(name, target, dict(cost_s or {}), description, fingerprint, config)
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
