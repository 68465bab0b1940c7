"""optfm's Opacus grad samplers for ``transformers`` layers, against per-example autograd
(``torch.func.vmap(torch.func.grad(...))``) in float64, layer by layer and for whole tiny causal
LMs (Llama and GPT-2, tied and untied embeddings, LoRA) with padding masks and ignored labels."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import (
    GradSampleHooks,
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from torch.func import functional_call, grad, vmap

from optfm.models.factories import tiny_gpt2, tiny_llama
from optfm.privacy import (
    causal_lm_per_sample_loss,
    modules_without_grad_sampler,
    prepare_lm_for_dp,
    register_transformers_grad_samplers,
    tied_parameters,
)
from optfm.privacy.grad_samplers import (
    compute_conv1d_grad_sample,
    compute_conv1d_norm_sample,
    compute_rms_norm_grad_sample,
)

TOL = {"atol": 1e-6, "rtol": 1e-6}
V, L = 40, 7


def _per_example_grads(module, x, r):
    """∇_θ Σ(module(x_i) ⊙ r_i) for every sample i, by vmap(grad) over a copy of ``module``."""
    ref = copy.deepcopy(module)
    params = {k: v.detach() for k, v in ref.named_parameters() if v.requires_grad}

    def loss(p, xi, ri):
        return (functional_call(ref, p, (xi[None],))[0] * ri).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, r)


def _opacus_grads(module, x, r, *, ghost=False):
    """Opacus's per-sample gradients (hooks) or per-sample gradient norms (ghost) of the same loss
    (a mean over samples, loss_reduction='mean')."""
    cls = GradSampleModuleFastGradientClipping if ghost else GradSampleModule
    gsm = cls(module)
    (gsm(x) * r).flatten(1).sum(1).mean().backward()
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            out[name] = p._norm_sample if ghost else p.grad_sample
    gsm._close()
    return out


def _conv1d(nx=5, nf=3):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf, nx).double()
    with torch.no_grad():
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("shape", [(4, 5), (4, 6, 5), (3, 2, 6, 5)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("train_bias", [True, False])
def test_conv1d_grad_sampler_matches_per_example_autograd(shape, train_bias):
    layer = _conv1d()
    layer.bias.requires_grad_(train_bias)
    register_transformers_grad_samplers()
    assert GradSampleHooks.GRAD_SAMPLERS[type(layer)] is compute_conv1d_grad_sample
    x = torch.randn(*shape, dtype=torch.float64)
    r = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    ref = _per_example_grads(layer, x, r)
    got = _opacus_grads(layer, x, r)
    assert set(got) == set(ref) == ({"weight", "bias"} if train_bias else {"weight"})
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL)


@pytest.mark.parametrize("shape", [(4, 5), (4, 6, 5), (4, 2, 3, 5)], ids=["2d", "3d", "4d"])
def test_conv1d_ghost_norm_sampler_matches_per_example_norms(shape):
    layer = _conv1d()
    register_transformers_grad_samplers()
    assert GradSampleHooksFastGradientClipping.NORM_SAMPLERS[type(layer)] is compute_conv1d_norm_sample
    x = torch.randn(*shape, dtype=torch.float64)
    r = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    ref = _per_example_grads(layer, x, r)
    got = _opacus_grads(layer, x, r, ghost=True)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k].flatten(1).norm(dim=1), **TOL)


RMS_NORMS = [("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm"),
             ("qwen3", "Qwen3RMSNorm")]


@pytest.mark.parametrize(("arch", "cls_name"), RMS_NORMS, ids=[c for _, c in RMS_NORMS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rms_norm_grad_sampler_matches_per_example_autograd(arch, cls_name, dtype):
    cls = getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), cls_name)
    register_transformers_grad_samplers()
    assert GradSampleHooks.GRAD_SAMPLERS[cls] is compute_rms_norm_grad_sample
    torch.manual_seed(0)
    layer = cls(6, eps=1e-3).to(dtype)  # a large eps: a wrong epsilon would show
    with torch.no_grad():
        layer.weight.normal_()
    x = 0.05 * torch.randn(4, 5, 6, dtype=dtype)
    r = torch.randn(4, 5, 6, dtype=dtype)
    ref = _per_example_grads(layer, x, r)
    got = _opacus_grads(layer, x, r)
    tol = TOL if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got["weight"], ref["weight"], **tol)


def test_registration_is_idempotent_and_lazy():
    import transformers.pytorch_utils  # noqa: F401  (the module of Conv1D)

    register_transformers_grad_samplers()
    before = dict(GradSampleHooks.GRAD_SAMPLERS)
    assert register_transformers_grad_samplers() == []  # nothing new the second time
    assert before == GradSampleHooks.GRAD_SAMPLERS


def _llama(tied: bool):
    torch.manual_seed(0)
    return tiny_llama(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=L,
                      tie_word_embeddings=tied)


def _gpt2(tied: bool):
    torch.manual_seed(0)
    return tiny_gpt2(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=L,
                     tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _lm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (4, L), generator=g)
    lengths = torch.tensor([L, 5, 3, 6])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a "prompt" that is not trained on
    return ids.masked_fill(mask == 0, 0), mask, labels


def _lm_reference(model, ids, mask, labels):
    """Per-example gradients of each sample's token-mean loss, by vmap(grad(functional_call)).
    transformers builds its attention mask with data-dependent control flow that vmap rejects,
    so the reference passes the equivalent prepared 4-D mask (causal ∧ key padding)."""
    ref = copy.deepcopy(model)
    params = {k: v.detach() for k, v in ref.named_parameters() if v.requires_grad}
    causal = torch.ones(L, L, dtype=torch.bool).tril()

    def loss(p, i, m, y):
        mask4 = (causal & m.bool()[None, :])[None, None]
        out = functional_call(ref, p, (), {"input_ids": i[None], "attention_mask": mask4,
                                           "position_ids": torch.arange(L)[None], "use_cache": False})
        return causal_lm_per_sample_loss(out.logits, y[None])

    return vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, ids, mask, labels)


CASES = [("llama", False, None), ("llama", True, None), ("gpt2", False, None), ("gpt2", True, None),
         ("llama", True, {"r": 2, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
         ("gpt2", True, {"r": 2, "target_modules": ["c_attn", "c_fc"]})]


@pytest.mark.parametrize(("arch", "tied", "lora"), CASES,
                         ids=[f"{a}-{'tied' if t else 'untied'}{'-lora' if lo else ''}" for a, t, lo in CASES])
def test_whole_causal_lm_per_sample_gradients_match_per_example_autograd(arch, tied, lora):
    """Every trainable parameter of a tiny Llama / GPT-2 LM (padding masks, ignored labels, the
    library's per-sample loss) gets exactly the per-example gradient through Opacus's hooks: no
    layer uses the functorch fallback; tied embeddings sum both uses; with LoRA, frozen base
    weights get no per-sample gradient at all."""
    model = (_llama if arch == "llama" else _gpt2)(tied).double()
    model = prepare_lm_for_dp(model, lora=lora)  # samplers, per-sample position ids, LoRA
    assert modules_without_grad_sampler(model) == []
    emb = model.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is emb) == tied
    assert bool(tied_parameters(model)) == (tied and lora is None)
    ids, mask, labels = _lm_batch()
    ref = _lm_reference(model, ids, mask, labels)

    gsm = GradSampleModule(model)
    assert not [n for n, m in model.named_modules() if hasattr(m, "ft_compute_sample_grad")]
    # no position_ids given: the hook of prepare_lm_for_dp passes per-sample ones (GPT-2's wpe)
    out = gsm(input_ids=ids, attention_mask=mask, use_cache=False)
    causal_lm_per_sample_loss(out.logits, labels).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(ref)
    if lora is not None:
        assert all("lora_" in n for n in trainable)
        assert all(getattr(p, "grad_sample", None) is None
                   for p in model.parameters() if not p.requires_grad)
    for name, p in trainable.items():
        assert isinstance(p.grad_sample, torch.Tensor), name  # one tensor, even when tied
        torch.testing.assert_close(p.grad_sample, ref[name], **TOL, msg=name)
    gsm._close()
