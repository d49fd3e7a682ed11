"""The model layer: LLM loading (`load`), multi-adapter LoRA (`lora`), the CF projector (`projector`),
the wrapper returning hidden states (`lm.ThinkRecLM`) and adapter files (`adapters`).

    python -m thinkrec.model export --adapters RUN/adapters --peft OUT     # one PEFT LoRA per adapter
    python -m thinkrec.model convert [--model SPEC]                        # fetch + convert, print the dir
"""

from .adapters import export_peft, load_adapters, save_adapters
from .lm import ThinkRecLM
from .load import ModelLoadError, load_llm, resolve_model
from .lora import LoRAConfig, LoRALinear, inject_lora, merge_lora, set_trainable
from .projector import CFProjector

__all__ = ["CFProjector", "LoRAConfig", "LoRALinear", "ModelLoadError", "ThinkRecLM", "export_peft",
           "inject_lora", "load_adapters", "load_llm", "merge_lora", "resolve_model", "save_adapters",
           "set_trainable"]
