"""AdvUnlearn components on tiny random-config CLIP text encoder + conditional UNet."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from optfm.data import build_word_tokenizer
from optfm.unlearning.advunlearn import (
    ESD,
    AdvUnlearn,
    AdvUnlearnConfig,
    DiscreteAttack,
    ESDConfig,
    SoftPromptAttack,
    attack_success_rate,
    encode_with_soft_prompt,
    esd_loss,
    esd_target,
    frechet_distance,
    negative_guidance,
    partial_sample,
    project_simplex,
    prompt_alignment,
    tokenize_prompts,
)

PROMPTS = ["a handwritten seven", "a handwritten three", "a bold one", "an inverted two"]


@pytest.fixture(scope="module")
def parts():
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = build_word_tokenizer(PROMPTS, model_max_length=8)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    enc = CLIPTextModel(cfg).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8).eval()
    sched = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    return enc, tok, unet, sched


def _fresh(parts):
    import copy

    enc, tok, unet, sched = parts
    return copy.deepcopy(enc), tok, copy.deepcopy(unet), sched


def _xt(parts, seed=0):
    enc, tok, unet, sched = parts
    ids = tokenize_prompts(tok, PROMPTS[0], max_length=8)
    with torch.no_grad():
        emb = encode_with_soft_prompt(enc, ids)
        emb_u = encode_with_soft_prompt(enc, tokenize_prompts(tok, "", max_length=8))
    x_t, t = partial_sample(unet, sched, emb, emb_u, steps=5, stop_index=2,
                            generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        target = unet(x_t, t, encoder_hidden_states=emb).sample
    return ids, x_t, t, target


def test_tokenize_adds_bos_eos_and_pads(parts):
    _, tok, _, _ = parts
    ids = tokenize_prompts(tok, ["a bold one", ""], max_length=8)
    assert ids.shape == (2, 8)
    assert ids[0, 0] == tok.bos_token_id and ids[0, 4] == tok.eos_token_id
    assert (ids[0, 5:] == tok.pad_token_id).all()
    assert ids[1, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]


def test_soft_prompt_equals_real_token(parts):
    enc, tok, _, _ = parts
    ids = tokenize_prompts(tok, PROMPTS[0])  # [BOS, a, handwritten, seven, EOS]
    ref = enc(input_ids=ids).last_hidden_state
    assert torch.allclose(encode_with_soft_prompt(enc, ids), ref, atol=1e-5)
    w = enc.get_input_embeddings().weight
    without = torch.cat([ids[:, :1], ids[:, 2:]], 1)
    out = encode_with_soft_prompt(enc, without, w[ids[0, 1:2]].detach())
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5)
    # inserting into a full-length (8) prompt truncates at max_position_embeddings
    full = tokenize_prompts(tok, PROMPTS[0], max_length=8)
    assert encode_with_soft_prompt(enc, full, torch.zeros(2, 32)).shape == (1, 8, 32)


def test_gradient_flows_to_soft_and_layers(parts):
    enc, tok, _, _ = _fresh(parts)
    ids = tokenize_prompts(tok, PROMPTS[1])
    soft = torch.randn(1, 32, requires_grad=True)
    encode_with_soft_prompt(enc, ids, soft).pow(2).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    layer_grads = [p.grad for n, p in enc.named_parameters() if "encoder.layers.0." in n]
    assert layer_grads and all(g is not None and g.abs().sum() > 0 for g in layer_grads)


def test_bad_inputs_raise(parts):
    enc, tok, unet, sched = parts
    ids = tokenize_prompts(tok, PROMPTS[0])
    with pytest.raises(ValueError, match="soft"):
        encode_with_soft_prompt(enc, ids, torch.zeros(1, 7))
    with pytest.raises(ValueError, match="position"):
        encode_with_soft_prompt(enc, ids, torch.zeros(1, 32), position=99)
    with pytest.raises(ValueError, match="stop_index"):
        partial_sample(unet, sched, torch.zeros(1, 5, 32), torch.zeros(1, 5, 32), steps=3,
                       stop_index=3)
    with pytest.raises(ValueError, match="epsilon"):
        SoftPromptAttack(epsilon=-1.0)
    with pytest.raises(ValueError, match="init"):
        SoftPromptAttack(init="zeros")
    with pytest.raises(ValueError, match="n_tokens"):
        DiscreteAttack(n_tokens=0)
    with pytest.raises(ValueError, match="gamma"):
        AdvUnlearnConfig("seven", gamma=-1).validate()
    with pytest.raises(ValueError, match="retain_prompts"):
        AdvUnlearnConfig("seven", gamma=1.0).validate()
    with pytest.raises(ValueError, match="train"):
        ESDConfig("seven", train="vae").validate()
    with pytest.raises(ValueError, match="post_success"):
        attack_success_rate([True, False], [True])
    with pytest.raises(ValueError, match="feats_b"):
        frechet_distance(np.zeros((3, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="labels"):
        prompt_alignment(np.full((2, 3), 0.3), [0, 3])


def test_esd_target_formula_and_zero_loss(parts):
    eu, ec = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    assert torch.allclose(negative_guidance(eu, ec, 1.0), 2 * eu - ec)
    assert torch.allclose(negative_guidance(eu, ec, 0.5), eu - 0.5 * (ec - eu))
    enc, tok, unet, _sched = parts
    ids, x_t, t, _ = _xt(parts)
    with torch.no_grad():
        emb_c = encode_with_soft_prompt(enc, ids)
        emb_u = encode_with_soft_prompt(enc, tokenize_prompts(tok, "", max_length=8))
        e_c = unet(x_t, t, encoder_hidden_states=emb_c).sample
        e_u = unet(x_t, t, encoder_hidden_states=emb_u).sample
    target = esd_target(unet, x_t, t, emb_c, emb_u, eta=1.0)
    assert torch.allclose(target, 2 * e_u - e_c, atol=1e-5)
    # η = 0: the target is ε(∅), so the loss of the empty prompt's embedding is 0
    t0 = esd_target(unet, x_t, t, emb_c, emb_u, eta=0.0)
    assert esd_loss(unet, x_t, t, emb_u, t0).item() < 1e-10
    assert esd_loss(unet, x_t, t, emb_c, target).item() > 0


def test_partial_sample_shapes(parts):
    enc, tok, unet, sched = parts
    ids = tokenize_prompts(tok, PROMPTS[:2], max_length=8)
    emb = encode_with_soft_prompt(enc, ids).detach()
    emb_u = encode_with_soft_prompt(enc, tokenize_prompts(tok, "", max_length=8)).detach()
    g = torch.Generator().manual_seed(1)
    x0, t0 = partial_sample(unet, sched, emb, emb_u, steps=4, stop_index=0, generator=g)
    assert x0.shape == (2, 1, 8, 8) and int(t0) == 75
    x, t = partial_sample(unet, sched, emb, emb_u, steps=4, stop_index=3,
                          generator=torch.Generator().manual_seed(1))
    assert int(t) == 0 and not torch.allclose(x, x0)


def test_soft_attack_lowers_objective_and_matches_manual_adam(parts):
    enc, _tok, unet, _sched = parts
    ids, x_t, t, target = _xt(parts)
    atk = SoftPromptAttack(n_tokens=1, steps=10, lr=0.05, seed=3)
    init = atk.initial(enc)
    res = atk(enc, unet, ids, x_t, t, target, init=init)
    assert res.final_loss < res.initial_loss
    assert len(res.losses) == 10
    # the model's own grads are not touched
    assert all(p.grad is None for p in enc.parameters())
    assert all(p.grad is None for p in unet.parameters())
    # manual loop with zero_grad every step
    soft = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        emb = encode_with_soft_prompt(enc, ids, soft)
        F.mse_loss(unet(x_t, t, encoder_hidden_states=emb).sample, target).backward()
        opt.step()
    assert torch.allclose(res.soft, soft.detach(), atol=1e-6)
    enc.zero_grad(set_to_none=True)
    unet.zero_grad(set_to_none=True)


def test_epsilon_ball_and_fast_variant(parts):
    enc, _tok, unet, _sched = parts
    ids, x_t, t, target = _xt(parts)
    atk = SoftPromptAttack(n_tokens=2, steps=15, lr=0.1, epsilon=0.05)
    init = atk.initial(enc)
    res = atk(enc, unet, ids, x_t, t, target, init=init)
    assert ((res.soft - init).norm(dim=-1) <= 0.05 + 1e-6).all()
    fast = SoftPromptAttack(n_tokens=1, steps=30, lr=1e-3, fast=True)
    init = fast.initial(enc)
    res = fast(enc, unet, ids, x_t, t, target, init=init)
    assert len(res.losses) == 1
    assert torch.allclose((res.soft - init).abs(), torch.full_like(init, 0.03), atol=1e-6)
    # "previous" init reuses the last result
    prev = SoftPromptAttack(steps=2, init="previous")
    r1 = prev(enc, unet, ids, x_t, t, target)
    assert torch.equal(prev.initial(enc), r1.soft)


def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def test_advunlearn_changes_only_trainable(parts):
    enc, tok, unet, sched = _fresh(parts)
    before_enc, before_unet = _snapshot(enc), _snapshot(unet)
    cfg = AdvUnlearnConfig("a handwritten seven", retain_prompts=PROMPTS[1:], gamma=0.3, lr=1e-2,
                           warmup=1, ddim_steps=3, retain_batch_size=2, attack_steps=3)
    tr = AdvUnlearn(enc, tok, unet, sched, cfg)
    hist = tr.train(3)
    assert len(hist) == 3 and hist[0]["attack_loss"] is None
    assert hist[1]["attack_loss"] is not None and hist[2]["utility_loss"] is not None
    assert all(np.isfinite(h["loss"]) for h in hist)
    tok_name = next(n for n in before_enc if "token_embedding" in n)
    assert not enc.get_parameter(tok_name).requires_grad
    changed = {n for n, p in enc.named_parameters() if not torch.equal(p, before_enc[n])}
    assert changed and changed <= set(tr.trainable_names)
    assert not any("embedding" in n for n in changed)
    assert any("final_layer_norm" in n for n in tr.trainable_names)
    assert all(torch.equal(p, before_unet[n]) for n, p in unet.named_parameters())
    # the original encoder copy is untouched
    assert all(torch.equal(p, before_enc[n]) for n, p in tr.text_encoder_orig.named_parameters())


def test_esd_unet_xattn_changes_only_attn2(parts):
    enc, tok, unet, sched = _fresh(parts)
    before_enc, before_unet = _snapshot(enc), _snapshot(unet)
    tr = ESD(enc, tok, unet, sched, ESDConfig("a handwritten seven", lr=1e-2, ddim_steps=3))
    tr.train(2)
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before_unet[n])}
    assert changed and all(".attn2." in n for n in changed)
    assert all(torch.equal(p, before_enc[n]) for n, p in enc.named_parameters())
    assert all(torch.equal(p, before_unet[n]) for n, p in tr.unet_orig.named_parameters())
    # text-encoder variant
    enc2, _, unet2, _ = _fresh(parts)
    tr2 = ESD(enc2, tok, unet2, sched, ESDConfig("a bold one", train="text_encoder", lr=1e-2,
                                                 ddim_steps=3))
    assert tr2.train(1)[0]["attack_loss"] is None
    assert all("embedding" not in n for n in tr2.trainable_names)


def test_discrete_attack(parts):
    enc, tok, unet, _sched = parts
    ids, x_t, t, target = _xt(parts)
    forbidden = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    atk = DiscreteAttack(n_tokens=5, steps=4, lr=0.01, forbidden_ids=forbidden, seed=1)
    res = atk(enc, unet, ids[:, :5], x_t, t, target)
    assert res.steps == 4 and res.success is None and len(res.losses) == 4
    assert res.prefix_ids.shape == (5,)
    assert not set(res.prefix_ids.tolist()) & set(forbidden)
    assert res.prompt_ids[0] == tok.bos_token_id
    assert res.prompt_ids[1:6].tolist() == res.prefix_ids.tolist()
    assert torch.allclose(atk.z.sum(-1), torch.ones(5), atol=1e-5) and (atk.z >= 0).all()
    # early stop: a judge that succeeds on its second call
    calls = []

    def judge(prompt_ids):
        calls.append(prompt_ids)
        return len(calls) >= 2

    res = DiscreteAttack(steps=10, forbidden_ids=forbidden)(enc, unet, ids[:, :5], x_t, t,
                                                             target, success_fn=judge)
    assert res.success is True and res.steps == 1 and len(calls) == 2
    # the straight-through forward is the discrete prompt's encoding
    w = enc.get_input_embeddings().weight
    a = encode_with_soft_prompt(enc, ids[:, :5], w[res.prefix_ids])
    assert torch.allclose(a, enc(input_ids=res.prompt_ids[None]).last_hidden_state, atol=1e-5)


def test_project_simplex():
    z = torch.tensor([[0.5, 0.9, -0.2], [1.0, 0.0, 0.0], [0.2, 0.2, 0.2]])
    p = project_simplex(z)
    assert torch.allclose(p.sum(-1), torch.ones(3)) and (p >= 0).all()
    assert torch.allclose(p[1], z[1]) and torch.allclose(p[2], torch.full((3,), 1 / 3))
    assert torch.allclose(p[0], torch.tensor([0.3, 0.7, 0.0]))


def test_metrics():
    pre = np.array([True, False, False, False])
    post = np.array([False, True, False, True])
    assert attack_success_rate(pre, post) == 0.75
    assert attack_success_rate([1, 0], [1, 0]) == 0.5  # a pre success counts once
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, abs=1e-6)
    assert frechet_distance(a, rng.normal(size=(200, 4)) * 2) > 1.0
    assert frechet_distance(np.zeros((5, 3)), np.zeros((5, 3))) == 0.0  # singular covariances
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert prompt_alignment(probs, [0, 1, 1]) == pytest.approx((0.9 + 0.8 + 0.4) / 3)
