"""User-facing errors: one line that names the problem and the fix."""


class DeftlabError(Exception):
    """An error caused by user input or environment, printed as one line by the CLI."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class UnknownNameError(DeftlabError):
    """An unknown model, dataset, experiment, preset, allocator, codec, ..."""

    def __init__(self, kind: str, name: str, known):
        known = sorted(known)
        super().__init__(
            f"unknown {kind} '{name}'",
            f"choose one of: {', '.join(known)}" if known else None,
        )


class DataNotFoundError(DeftlabError):
    pass


class MalformedDataError(DeftlabError):
    pass


class CacheCorruptError(DeftlabError):
    pass


class BudgetError(DeftlabError):
    pass
