"""Fine-tuning methods on dense or decomposed models: LoRA/QLoRA/LoftQ via PEFT, full, WeLore LRC."""

from deftlab.adapters.attach import attach, copy_tails, load_adapter, lora_target_names, merge_for_eval
from deftlab.adapters.config import AdapterConfig

__all__ = ["AdapterConfig", "attach", "copy_tails", "load_adapter", "lora_target_names", "merge_for_eval"]
