"""Contrastive learning: EMC² (MCMC negatives), SogCLR and SimCLR (``specs/contrastive.md``).

- :mod:`~optfm.contrastive.losses` - NT-Xent, :class:`SogCLRState` (one float per sample),
  :class:`EMC2State` (one index + one score per sample, in-batch Metropolis–Hastings), and the
  exact global contrastive loss.
- :mod:`~optfm.contrastive.augment`, :mod:`~optfm.contrastive.models`,
  :mod:`~optfm.contrastive.evaluation` - digits-on-canvas augmentations, MLP backbone +
  projector, linear-probe and k-NN accuracy.
"""

from optfm.contrastive.losses import EMC2State, SogCLRState, exact_gcl, nt_xent_loss

__all__ = ["EMC2State", "SogCLRState", "exact_gcl", "nt_xent_loss"]
