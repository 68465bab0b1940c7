"""Unlearning: NGDiff for LLMs (``unlearning/ngdiff.py``) and AdvUnlearn for concept erasure in
diffusion models (``unlearning/advunlearn.py``).

Will hold the NGDiff direction with its automatic learning rate, GA/GradDiff/NPO/SimNPO
baselines, TOFU/MUSE-style metrics, and AdvUnlearn with the ESD loss and soft-prompt attacks.
See ``specs/unlearning.md`` and ``specs/concept_erasure.md``.
"""
