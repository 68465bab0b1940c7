"""Memory-efficient pretraining: SLTrain sparse + low-rank layers (``pretraining/sltrain.py``), the
pure low-rank baseline (``pretraining/lowrank.py``), the pretraining recipe (``recipe.py``) and
exact memory accounting (``memory.py``). See ``specs/pretraining.md``."""

from optfm.pretraining.lowrank import LowRankLinear, apply_lowrank
from optfm.pretraining.memory import (
    LLAMA_SIZES,
    module_static_bytes,
    optimizer_state_bytes,
    paper_scale_table,
    parameter_breakdown,
    static_memory_bytes,
)
from optfm.pretraining.recipe import (
    PretrainConfig,
    build_optimizer,
    evaluate,
    pretrain,
    warmup_cosine,
)
from optfm.pretraining.sltrain import (
    LLAMA_TARGET_MODULES,
    SLTrainConfig,
    SLTrainFunction,
    SLTrainLinear,
    apply_sltrain,
    merge_sltrain,
    random_support,
)

__all__ = [
    "LLAMA_SIZES",
    "LLAMA_TARGET_MODULES",
    "LowRankLinear",
    "PretrainConfig",
    "SLTrainConfig",
    "SLTrainFunction",
    "SLTrainLinear",
    "apply_lowrank",
    "apply_sltrain",
    "build_optimizer",
    "evaluate",
    "merge_sltrain",
    "module_static_bytes",
    "optimizer_state_bytes",
    "paper_scale_table",
    "parameter_breakdown",
    "pretrain",
    "random_support",
    "static_memory_bytes",
    "warmup_cosine",
]
