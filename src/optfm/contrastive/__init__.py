"""Contrastive learning with small batches: EMC² MCMC negative sampling (``contrastive/emc2.py``),
with SimCLR (NT-Xent) and SogCLR as baselines. See ``specs/contrastive.md``.
"""
