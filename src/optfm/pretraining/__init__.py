"""Memory-efficient pretraining: SLTrain sparse + low-rank layers (``pretraining/sltrain.py``).

Will hold ``SLTrainLinear`` (custom autograd Function that never saves the dense weight),
``apply_sltrain`` / ``merge_sltrain`` for any ``transformers`` model, a pure low-rank baseline
layer and exact memory accounting. See ``specs/pretraining.md``.
"""
