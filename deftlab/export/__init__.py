"""Standalone Hugging Face exports of fine-tuned runs (`deftlab export RUN --format factored|merged DIR`)."""

from deftlab.export.exporter import (
    FORMATS,
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
from deftlab.models.factored_format import MODELING_FILE, RECORD_FILE, export_record, is_factored_export, load_factored

__all__ = ["FORMATS", "MODELING_FILE", "RECORD_FILE", "PreparedRun", "dequantize_4bit_linears", "export_model",
           "export_prepared", "export_record", "export_run", "factored_ranks", "is_factored_export", "load_factored",
           "multiply_factors", "prepare", "resolve_run"]
