"""Unlearning: NGDiff for LLMs (``unlearning/ngdiff.py``) and AdvUnlearn for concept erasure in
diffusion models (``unlearning/advunlearn.py``).

- :class:`NGDiff` - the normalized gradient difference direction (any ``torch.optim`` optimizer).
- :class:`AutoLR` - GeN-style automatic learning rate that never steps the optimizer twice.
- :mod:`~optfm.unlearning.objectives` - GA, GradDiff, NPO, SimNPO forget objectives.
- :class:`Unlearner` - the trainer for ``transformers`` causal LMs (optional LoRA via ``peft``).
- :class:`AdvUnlearn`, :class:`ESD` - robust concept erasure in text-to-image diffusion models
  (soft-prompt and discrete attacks, ASR / Fréchet distance metrics).
- :mod:`~optfm.unlearning.metrics` - TOFU/MUSE metrics (truth ratio, forget quality, model
  utility, VerbMem, KnowMem, PrivLeak, degeneracy).

See ``specs/unlearning.md`` and ``docs/unlearning.md``.
"""

from optfm.unlearning.advunlearn import (
    ESD,
    AdvUnlearn,
    AdvUnlearnConfig,
    DiscreteAttack,
    ESDConfig,
    SoftPromptAttack,
)
from optfm.unlearning.auto_lr import AutoLR, ProbeResult
from optfm.unlearning.ngdiff import (
    LinearCombination,
    NGDiff,
    TwoTaskGradient,
    TwoTaskStats,
    ngdiff_direction,
)
from optfm.unlearning.objectives import ga_loss, grad_diff_loss, npo_loss, simnpo_loss
from optfm.unlearning.trainer import (
    METHODS,
    UnlearnConfig,
    Unlearner,
    UnlearningDiverged,
    as_pairs,
)

__all__ = [
    "ESD",
    "METHODS",
    "AdvUnlearn",
    "AdvUnlearnConfig",
    "AutoLR",
    "DiscreteAttack",
    "ESDConfig",
    "LinearCombination",
    "NGDiff",
    "ProbeResult",
    "SoftPromptAttack",
    "TwoTaskGradient",
    "TwoTaskStats",
    "UnlearnConfig",
    "Unlearner",
    "UnlearningDiverged",
    "as_pairs",
    "ga_loss",
    "grad_diff_loss",
    "ngdiff_direction",
    "npo_loss",
    "simnpo_loss",
]
