"""Memory-efficient pretraining: SLTrain sparse + low-rank layers (``pretraining/sltrain.py``) and
the pure low-rank baseline (``pretraining/lowrank.py``). See ``specs/pretraining.md``."""

from optfm.pretraining.lowrank import LowRankLinear, apply_lowrank
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
    "pretrain",
    "random_support",
    "warmup_cosine",
]
