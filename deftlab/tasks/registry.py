"""Task names → task classes (imported lazily, so listing tasks loads no data code)."""

from __future__ import annotations

import importlib
import inspect

from deftlab.errors import DeftlabError, UnknownNameError

TASKS: dict[str, str] = {
    "arith": "deftlab.tasks.arithmetic:ArithmeticTask",
    "generated": "deftlab.tasks.arithmetic:GeneratedArithmeticTask",
    "xsum": "deftlab.tasks.xsum:XSumTask",
    "math": "deftlab.tasks.math:MathTask",
    "text": "deftlab.tasks.text:TextTask",
}


def task_names() -> list[str]:
    return sorted(TASKS)


def task_class(name: str) -> type:
    if name not in TASKS:
        raise UnknownNameError("task", name, TASKS)
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_task(name: str, **options):
    """Build task `name` with its keyword options (e.g. eval_sets, max_new_tokens); unknown options are an error."""
    cls = task_class(name)
    params = inspect.signature(cls.__init__).parameters
    bad = sorted(k for k in options if k not in params)
    if bad:
        known = sorted(k for k in params if k != "self")
        raise DeftlabError(f"task '{name}' has no option(s) {bad}", f"valid options: {', '.join(known)}")
    return cls(**options)
