"""Fine-tuning methods on dense or decomposed models: LoRA/QLoRA/LoftQ via PEFT, full, WeLore LRC, and
LLM-Adapters' series/parallel bottleneck adapters."""

from deftlab.adapters.attach import attach, copy_tails, load_adapter, lora_target_names, merge_for_eval
from deftlab.adapters.bottleneck import BottleneckAdapter, attach_bottleneck
from deftlab.adapters.checkpoint import load_decomposed_checkpoint, read_rank_map, save_decomposed
from deftlab.adapters.config import AdapterConfig

__all__ = ["AdapterConfig", "BottleneckAdapter", "attach", "attach_bottleneck", "copy_tails", "load_adapter",
           "load_decomposed_checkpoint", "lora_target_names", "merge_for_eval", "read_rank_map", "save_decomposed"]
