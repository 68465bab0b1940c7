"""Softmax vs Gaussian attention kernels (``attention/kernels.py``) and the tools to study gradient
descent on a single Transformer layer. See ``specs/attention.md``.
"""
