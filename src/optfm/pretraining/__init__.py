"""Memory-efficient pretraining: SLTrain sparse + low-rank layers (``pretraining/sltrain.py``), the
pure low-rank baseline (``pretraining/lowrank.py``), per-layer weight updates
(``per_layer.py``), the pretraining recipe with fp32 and 8-bit optimizers (``recipe.py``) and
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
from optfm.pretraining.per_layer import PerLayerOptimizer, per_layer_optimizer
from optfm.pretraining.recipe import (
    OPTIMIZERS,
    PretrainConfig,
    build_optimizer,
    evaluate,
    optimizer_class,
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
    "OPTIMIZERS",
    "LowRankLinear",
    "PerLayerOptimizer",
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
    "optimizer_class",
    "optimizer_state_bytes",
    "paper_scale_table",
    "parameter_breakdown",
    "per_layer_optimizer",
    "pretrain",
    "random_support",
    "static_memory_bytes",
    "warmup_cosine",
]
