"""Alignment: IRL-based SFT (``alignment/irl_sft.py``), AIHF (``alignment/aihf.py``) and Direct
Noise Optimization for diffusion models (``alignment/dno.py``).

Will hold sequence-level losses (SFT, DPO, SPIN/IRFT, AIHF), trainers for any ``transformers``
causal LM with TRL-format datasets, and DNO over ``diffusers`` samplers. See
``specs/alignment.md`` and ``specs/dno.md``.
"""
