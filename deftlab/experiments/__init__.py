"""Paper experiments as data: registry (experiments/*.yaml), runner, results store, tables, figures, sweeps.

    from deftlab.experiments import load_experiment, ResultsStore, run_experiment, build_table
    exp = load_experiment("table5")
    store = ResultsStore()                      # $DEFTLAB_RESULTS or ./results
    run_experiment(exp, "smoke", store)         # runs only what is missing
    print(build_table(exp, "smoke", store).markdown())
"""

from deftlab.experiments.kinds import get_kind, known_kinds, register_kind, unregister_kind
from deftlab.experiments.registry import Experiment, experiment_names, load_all, load_experiment
from deftlab.experiments.runner import RunFailedError, RunSpec, execute, expand, plan, run_experiment
from deftlab.experiments.tables import build_table
from deftlab.store import ResultsStore, run_key

__all__ = [
    "Experiment", "ResultsStore", "RunFailedError", "RunSpec", "build_table", "execute", "expand",
    "experiment_names", "get_kind", "known_kinds", "load_all", "load_experiment", "plan", "register_kind",
    "run_experiment", "run_key", "unregister_kind",
]
