"""optfm.attention.kernels and .encoder: softmax / Gaussian scores, KernelAttention, the encoder."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from optfm.attention import (
    AttentionUnderflowError,
    KernelAttention,
    TransformerClassifier,
    attention_scores,
    count_underflow_rows,
)

DT = torch.float64


def _qkv(b=2, h=3, n=5, m=6, d=4, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=DT)
    k = torch.randn(b, h, m, d, generator=g, dtype=DT)
    v = torch.randn(b, h, m, dv, generator=g, dtype=DT)
    return q, k, v


def _bool_mask(shape, seed=1, p=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > p
    mask[..., 0] = True  # no fully masked row (SDPA returns NaN there)
    return mask


# ----- attention_scores ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.7])
def test_softmax_scores_match_sdpa(scale):
    q, k, v = _qkv()
    bool_mask = _bool_mask((2, 1, 5, 6))
    float_mask = torch.randn(5, 6, dtype=DT).masked_fill(~bool_mask[0, 0], float("-inf"))
    for mask in (None, bool_mask, float_mask):
        s = attention_scores(q, k, kernel="softmax", scale=scale, mask=mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        torch.testing.assert_close(s @ v, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(s.sum(-1), torch.ones(2, 3, 5, dtype=DT))


def test_gaussian_scores_closed_form_and_unnormalised():
    q, k, _ = _qkv(d=4)
    s = attention_scores(q, k, kernel="gaussian")
    ref = torch.exp(-torch.cdist(q, k).pow(2) / (2 * math.sqrt(4)))
    torch.testing.assert_close(s, ref, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(s.sum(-1), torch.ones_like(s.sum(-1)))
    s2 = attention_scores(q, k, kernel="gaussian", scale=0.3)
    torch.testing.assert_close(s2, torch.exp(-torch.cdist(q, k).pow(2) * 0.3 / 2))
    same = attention_scores(q, q, kernel="gaussian")  # q_j = k_j: diagonal exactly 1 (clamp)
    torch.testing.assert_close(same.diagonal(dim1=-2, dim2=-1), torch.ones(2, 3, 5, dtype=DT))


def test_normalized_gaussian_is_softmax_with_key_norm_penalty():
    q, k, _ = _qkv()
    scale = 1 / math.sqrt(q.shape[-1])
    mask = _bool_mask((2, 3, 5, 6))
    s = attention_scores(q, k, kernel="gaussian", normalize_rows=True, mask=mask)
    logits = q @ k.transpose(-2, -1) * scale - k.pow(2).sum(-1).unsqueeze(-2) * scale / 2
    ref = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(s, ref, atol=1e-12, rtol=1e-10)
    unnorm = attention_scores(q, k, kernel="gaussian", mask=mask)
    torch.testing.assert_close(s, unnorm / unnorm.sum(-1, keepdim=True))


@pytest.mark.parametrize(("kernel", "normalize"), [("softmax", False), ("gaussian", False),
                                                   ("gaussian", True)])
def test_gradcheck(kernel, normalize):
    q, k, _ = _qkv(b=1, h=2, n=3, m=4, d=3)
    mask = _bool_mask((1, 2, 3, 4), p=0.4)
    for m in (None, mask):
        def f(q, k, m=m):
            return attention_scores(q, k, kernel=kernel, normalize_rows=normalize, mask=m)

        assert torch.autograd.gradcheck(f, (q.requires_grad_(), k.requires_grad_()))


@pytest.mark.parametrize(("kernel", "normalize"), [("softmax", False), ("gaussian", False),
                                                   ("gaussian", True)])
def test_masked_entries_zero_and_fully_masked_rows(kernel, normalize):
    q, k, _ = _qkv(n=3, m=4)
    q.requires_grad_()
    k.requires_grad_()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 1:] = False  # row 0 keeps key 0 only
    mask[2] = False  # row 2 fully masked
    for m in (mask, torch.zeros(3, 4, dtype=DT).masked_fill(~mask, float("-inf"))):
        s = attention_scores(q, k, kernel=kernel, normalize_rows=normalize, mask=m)
        assert torch.all(s[..., ~mask] == 0)
        assert torch.all(s[..., 2, :] == 0)
        assert torch.isfinite(s).all()
        s.sum().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
        q.grad = k.grad = None
    if kernel == "softmax" or normalize:
        torch.testing.assert_close(s[..., 0, 0], torch.ones(2, 3, dtype=DT))


def test_attention_scores_errors():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"kernel must be one of \('softmax', 'gaussian'\)"):
        attention_scores(q, k, kernel="linear")
    with pytest.raises(ValueError, match="last"):
        attention_scores(q, k[..., :3], kernel="softmax")
    with pytest.raises(ValueError, match="mask of shape"):
        attention_scores(q, k, kernel="softmax", mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype"):
        attention_scores(q, k, kernel="softmax", mask=torch.ones(5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="scale"):
        attention_scores(q, k, kernel="gaussian", scale=-1.0)


# ----- KernelAttention ----------------------------------------------------------------------------


def _reference_mha(att: KernelAttention, x, mask):
    b, n, _ = x.shape
    h, d = att.num_heads, att.head_dim
    q = att.W_Q(x).view(b, n, h, d).transpose(1, 2)
    k = att.W_K(x).view(b, n, h, d).transpose(1, 2)
    v = att.W_V(x).view(b, n, h, att.value_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return att.W_O(out.transpose(1, 2).reshape(b, n, -1))


def test_kernel_attention_softmax_matches_sdpa_with_masks():
    torch.manual_seed(0)
    att = KernelAttention(12, 3, bias=True).double()
    x = torch.randn(2, 5, 12, dtype=DT)
    torch.testing.assert_close(att(x), _reference_mha(att, x, None), atol=1e-6, rtol=0)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    keep = ~pad[:, None, None, :] & causal
    out, s = att(x, key_padding_mask=pad, attn_mask=causal, return_scores=True)
    torch.testing.assert_close(out, _reference_mha(att, x, keep), atol=1e-6, rtol=0)
    assert s.shape == (2, 3, 5, 5) and torch.all(s[1, :, :, 3:] == 0)
    additive = torch.randn(2, 5, 5, dtype=DT)
    ref_mask = additive[:, None].masked_fill(pad[:, None, None, :], float("-inf"))
    torch.testing.assert_close(att(x, key_padding_mask=pad, attn_mask=additive),
                               _reference_mha(att, x, ref_mask), atol=1e-6, rtol=0)


def test_kernel_attention_shapes_parameters_and_fully_masked_rows():
    att = KernelAttention(8, 2, kernel="gaussian", head_dim=3, value_dim=5, out_proj=False)
    assert att.W_Q.weight.shape == (6, 8) and att.W_V.weight.shape == (10, 8)
    assert att.W_O is None and att.output_dim == 10
    x = torch.randn(3, 4, 8)
    assert att(x).shape == (3, 4, 10)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False  # query 1 attends to nothing -> zero output, no NaN
    for kernel in ("softmax", "gaussian"):
        a = KernelAttention(8, 2, kernel=kernel, out_proj=False)
        out = a(x, attn_mask=mask)
        assert torch.all(out[:, 1] == 0) and torch.isfinite(out).all()


def test_kernel_attention_padding_does_not_leak():
    torch.manual_seed(0)
    for kernel, norm in (("softmax", False), ("gaussian", False), ("gaussian", True)):
        att = KernelAttention(8, 2, kernel=kernel, normalize_rows=norm, on_underflow="ignore")
        x = torch.randn(1, 6, 8)
        pad = torch.tensor([[False] * 4 + [True] * 2])
        out = att(x, key_padding_mask=pad)
        x2 = x.clone()
        x2[:, 4:] = 100.0  # garbage in the padded positions changes nothing for real tokens
        torch.testing.assert_close(att(x2, key_padding_mask=pad)[:, :4], out[:, :4])
        torch.testing.assert_close(out[:, :4], att(x[:, :4]))


def test_kernel_attention_gradcheck():
    torch.manual_seed(0)
    for kernel in ("softmax", "gaussian"):
        att = KernelAttention(4, 2, kernel=kernel, bias=True).double()
        x = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
        pad = torch.tensor([[False, False, True], [False, False, False]])
        assert torch.autograd.gradcheck(lambda x, a=att, p=pad: a(x, key_padding_mask=p), (x,))


def test_underflow_warn_raise_ignore():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    att = KernelAttention(8, 1, kernel="gaussian")
    with torch.no_grad():
        att.W_Q.weight.mul_(100.0)  # huge queries: every exp(-|q-k|^2/(2 sqrt d)) underflows
    with pytest.warns(RuntimeWarning, match=r"8 of 8 Gaussian attention rows vanished"):
        out = att(x)
    assert att.last_underflow_rows == 8 and torch.all(out == 0)
    att.on_underflow = "raise"
    with pytest.raises(AttentionUnderflowError, match="smaller init"):
        att(x)
    assert issubclass(AttentionUnderflowError, RuntimeError)
    att.on_underflow = "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        att(x)
        KernelAttention(8, 1, kernel="gaussian", normalize_rows=True)(x)  # log domain: no underflow
        KernelAttention(8, 1, kernel="gaussian")(x)  # default init: fine
    with pytest.raises(ValueError, match="on_underflow"):
        KernelAttention(8, kernel="gaussian", on_underflow="silent")


def test_count_underflow_rows_ignores_fully_masked_rows():
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=DT)
    assert count_underflow_rows(s) == 2
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    assert count_underflow_rows(s, mask) == 1
    additive = torch.zeros(3, 2, dtype=DT).masked_fill(~mask, float("-inf"))
    assert count_underflow_rows(s, additive) == 1


def test_count_underflow_rows_flags_rows_below_machine_epsilon():
    """Rows of tiny but non-zero weights carry no gradient at working precision: flagged too."""
    eps = torch.finfo(DT).eps
    s = torch.tensor([[1e-18, 1e-30], [eps, 0.0], [4 * eps, 0.0], [0.5, 1e-300]], dtype=DT)
    assert count_underflow_rows(s) == 2
    assert count_underflow_rows(s.float()) == 3  # float32: eps 1.2e-7 covers 4 · 2.2e-16 too


def test_kernel_attention_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        KernelAttention(10, 3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        KernelAttention(8, kernel="cosine")
    with pytest.raises(ValueError, match="embed_dim"):
        KernelAttention(0)
    with pytest.raises(ValueError, match="dropout"):
        KernelAttention(8, dropout=1.0)
    att = KernelAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, n, 8\)"):
        att(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        att(torch.randn(2, 3, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="True = padding"):
        att(torch.randn(2, 3, 8), key_padding_mask=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        att(torch.randn(2, 3, 8), attn_mask=torch.ones(3, 4, dtype=torch.bool))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    att = KernelAttention(8, 2, dropout=0.5)
    x = torch.randn(2, 5, 8)
    att.eval()
    torch.testing.assert_close(att(x), att(x))
    att.train()
    assert not torch.allclose(att(x), att(x))


# ----- TransformerClassifier ----------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("kernel", ["softmax", "gaussian"])
def test_encoder_padding_invariance(kernel, pooling):
    torch.manual_seed(0)
    model = TransformerClassifier(12, 3, d_model=16, num_heads=2, num_layers=2,
                                  dim_feedforward=32, max_len=16, kernel=kernel, pooling=pooling)
    model.eval()
    ids = torch.randint(1, 12, (3, 6))
    ids[2, 4:] = 0  # a row that is already padded
    padded = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded), model(ids), atol=1e-5, rtol=1e-5)
    assert model(ids).shape == (3, 3)


def _toy_task(n=64, length=8, seed=0):
    """Every sequence uses tokens 1-4 (class 0) or 5-8 (class 1); random right padding."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(1, 5, (n, length), generator=g) + 4 * y[:, None]
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids, y


@pytest.mark.parametrize(("kernel", "normalize"), [("softmax", False), ("gaussian", False),
                                                   ("gaussian", True)])
def test_encoder_learns_toy_task(kernel, normalize):
    torch.manual_seed(0)
    ids, y = _toy_task()
    model = TransformerClassifier(10, 2, d_model=32, num_heads=4, num_layers=1,
                                  dim_feedforward=64, max_len=8, kernel=kernel,
                                  normalize_rows=normalize, dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    assert (model(ids).argmax(-1) == y).float().mean() > 0.95


def test_encoder_errors():
    with pytest.raises(ValueError, match="pooling"):
        TransformerClassifier(10, 2, pooling="max")
    with pytest.raises(ValueError, match="kernel must be one of"):
        TransformerClassifier(10, 2, kernel="relu")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TransformerClassifier(10, 2, d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="pad_id"):
        TransformerClassifier(10, 2, pad_id=10)
    with pytest.raises(ValueError, match="num_classes"):
        TransformerClassifier(10, 1)
    model = TransformerClassifier(10, 2, d_model=8, num_heads=2, max_len=6)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.ones(7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        model(torch.full((2, 3), 10))
    with pytest.raises(ValueError, match="non-pad token"):
        model(torch.tensor([[1, 2, 0], [0, 0, 0]]))
