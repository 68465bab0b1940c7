"""Softmax vs Gaussian attention kernels and gradient descent on a single Transformer layer
(``specs/attention.md``; paper: "Unraveling the Gradient Descent Dynamics of Transformers").

- :mod:`~optfm.attention.kernels` - :func:`attention_scores` (softmax / Gaussian, optional row
  normalisation, masks) and :class:`KernelAttention`, a drop-in multi-head self-attention module
  that detects Gaussian underflow (:class:`AttentionUnderflowError`).
- :mod:`~optfm.attention.encoder` - :class:`TransformerClassifier`, a small pre-LN encoder for
  sequence classification built on :class:`KernelAttention`.
- :mod:`~optfm.attention.study` - the paper's single layer (:class:`SingleLayer`), teacher data,
  full-batch GD (:func:`train_gd`), σ_min of the stacked attention output, the minimum Hessian
  eigenvalue (Lanczos), filter-normalised 2-D loss slices and two-stage training.
"""

from optfm.attention.encoder import EncoderBlock, TransformerClassifier
from optfm.attention.kernels import (
    AttentionUnderflowError,
    KernelAttention,
    attention_scores,
    count_underflow_rows,
)
from optfm.attention.study import (
    GDResult,
    SingleLayer,
    TeacherData,
    TwoStageResult,
    filter_normalized_directions,
    loss_slice_2d,
    make_student,
    make_teacher_data,
    max_hessian_eigenvalue,
    min_hessian_eigenvalue,
    regression_loss,
    sigma_min,
    stacked_attention_output,
    train_gd,
    trainable_parameters,
    two_stage_training,
)

__all__ = [
    "AttentionUnderflowError",
    "EncoderBlock",
    "GDResult",
    "KernelAttention",
    "SingleLayer",
    "TeacherData",
    "TransformerClassifier",
    "TwoStageResult",
    "attention_scores",
    "count_underflow_rows",
    "filter_normalized_directions",
    "loss_slice_2d",
    "make_student",
    "make_teacher_data",
    "max_hessian_eigenvalue",
    "min_hessian_eigenvalue",
    "regression_loss",
    "sigma_min",
    "stacked_attention_output",
    "train_gd",
    "trainable_parameters",
    "two_stage_training",
]
