"""Alignment: IRL-based SFT (``alignment/irl_sft.py``), AIHF (``alignment/aihf.py``) and Direct
Noise Optimization for diffusion models (``alignment/dno.py``, rewards in ``dno_rewards.py``).

- :mod:`~optfm.alignment.losses` - NLL, DPO, Bradley–Terry, SPIN/IRFT, AIHF as pure functions of
  sequence log-probs.
- :class:`SFTTrainer`, :class:`DPOTrainer` - baselines.
- :class:`IRFTTrainer` (implicit reward, stagewise), :class:`RFTTrainer` (explicit reward + RLOO).
- :class:`AIHFTrainer` (``nll`` / ``self_play`` forms), :class:`AIHFRewardTrainer` (explicit reward).
- :class:`DNO` - optimise the injected noise of a frozen diffusion sampler for a reward
  (``grad``, ``zeroth_order``, ``hybrid`` estimators; probability regulariser).

All trainers take any ``transformers`` causal LM + tokenizer and TRL-format datasets. See
``specs/alignment.md`` and ``docs/alignment.md``.
"""

from optfm.alignment.aihf import AIHF_FORMS, AIHFRewardTrainer, AIHFTrainer
from optfm.alignment.baselines import DPOTrainer, SFTTrainer
from optfm.alignment.common import AlignConfig, AlignTrainer, batch_logprob, frozen_copy, generate
from optfm.alignment.dno import DNO, DNO_ESTIMATORS, probability_regularizer
from optfm.alignment.irl_sft import IRFTTrainer, RFTTrainer, sequence_reward
from optfm.alignment.losses import aihf_loss, bt_reward_loss, dpo_loss, nll_loss, spin_loss

__all__ = [
    "AIHF_FORMS",
    "DNO",
    "DNO_ESTIMATORS",
    "AIHFRewardTrainer",
    "AIHFTrainer",
    "AlignConfig",
    "AlignTrainer",
    "DPOTrainer",
    "IRFTTrainer",
    "RFTTrainer",
    "SFTTrainer",
    "aihf_loss",
    "batch_logprob",
    "bt_reward_loss",
    "dpo_loss",
    "frozen_copy",
    "generate",
    "nll_loss",
    "probability_regularizer",
    "sequence_reward",
    "spin_loss",
]
