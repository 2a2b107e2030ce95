"""Standalone Hugging Face exports of fine-tuned runs (`deftlab export RUN --format factored|merged DIR`)."""

from deftlab.export.exporter import (
    FORMATS,
    MODELING_FILE,
    RECORD_FILE,
    PreparedRun,
    dequantize_4bit_linears,
    export_model,
    export_prepared,
    export_run,
    factored_ranks,
    multiply_factors,
    prepare,
    resolve_run,
)

__all__ = ["FORMATS", "MODELING_FILE", "RECORD_FILE", "PreparedRun", "dequantize_4bit_linears", "export_model",
           "export_prepared", "export_run", "factored_ranks", "multiply_factors", "prepare", "resolve_run"]
