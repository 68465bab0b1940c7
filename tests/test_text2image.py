"""Tiny text-to-image digits model (optfm.diffusion.text2image): fast checks, no full training."""

from __future__ import annotations

import pytest
import torch

from optfm.diffusion import DDIMSampler
from optfm.diffusion.text2image import (
    PROMPT_DIGITS,
    PROMPT_LENGTH,
    TextToImage,
    all_prompts,
    apply_style,
    build_prompt_tokenizer,
    digit_prompt,
    load_or_train_second_unet,
    load_or_train_text2image,
    tiny_text_encoder,
    tiny_text_unet,
    train_text2image,
)

TINY = {"steps": 3, "batch_size": 8, "warmup_steps": 1}


@pytest.fixture(scope="module")
def tiny_model() -> TextToImage:
    return train_text2image(**TINY)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prompts_and_tokenizer_round_trip():
    assert digit_prompt(7) == "a handwritten seven"
    assert digit_prompt(0, "bold") == "a bold handwritten zero"
    assert len(PROMPT_DIGITS) == 10 and len(set(all_prompts())) == 30
    tok = build_prompt_tokenizer()
    assert tok.pad_token_id == 0 and tok.bos_token_id == 2 and tok.eos_token_id == 3
    model = TextToImage(tok, tiny_text_encoder(tok), tiny_text_unet(), {})
    prompts = [*all_prompts(), ""]
    ids = model.tokenize(prompts)
    assert ids.shape == (len(prompts), PROMPT_LENGTH)
    assert (ids[:, 0] == tok.bos_token_id).all()
    for p, row in zip(prompts, ids, strict=True):
        assert tok.decode(row, skip_special_tokens=True) == p
        assert tok.unk_token_id not in row.tolist()
    # unknown words map to [UNK], long prompts are truncated to the fixed length
    assert tok.unk_token_id in model.tokenize("a handwritten banana")[0].tolist()
    assert model.tokenize(" ".join(["a"] * 20)).shape == (1, PROMPT_LENGTH)


def test_style_transforms():
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    bold, thin = apply_style(x, "bold"), apply_style(x, "thin")
    assert (bold >= x - 1e-6).all() and (thin <= x + 1e-6).all()
    assert bold.min() >= -1 and bold.max() <= 1 and thin.min() >= -1 and thin.max() <= 1
    assert torch.equal(apply_style(x, None), x)


def test_encode_shapes(tiny_model):
    e = tiny_model.encode([digit_prompt(1), digit_prompt(2, "thin"), ""])
    hidden = tiny_model.text_encoder.config.hidden_size
    assert e.shape == (3, PROMPT_LENGTH, hidden)
    assert tiny_model.unet.config.cross_attention_dim == hidden
    assert tiny_model.encode("a handwritten one").shape == (1, PROMPT_LENGTH, hidden)


def test_training_reduces_loss():
    losses: list[float] = []
    train_text2image(steps=40, batch_size=16, lr=3e-3, warmup_steps=5, ema_decay=0.0,
                     losses=losses)
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_generate_shape_range_and_guidance(tiny_model):
    prompts = [digit_prompt(3), digit_prompt(8)]
    out = {}
    for gs in (1.0, 5.0):
        out[gs] = tiny_model.generate(prompts, steps=4, guidance_scale=gs,
                                      generator=torch.Generator().manual_seed(0))
        assert out[gs].shape == (2, 1, 8, 8)
        assert torch.isfinite(out[gs]).all() and out[gs].abs().max() < 1e3
    assert not torch.allclose(out[1.0], out[5.0])
    again = tiny_model.generate(prompts, steps=4, guidance_scale=5.0,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, out[5.0])
    s = tiny_model.sampler(steps=5, eta=1.0, guidance_scale=2.0)
    assert isinstance(s, DDIMSampler) and s.num_inference_steps == 5 and s.eta == 1.0


def test_cache_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTFM_CACHE", str(tmp_path))
    a = load_or_train_text2image(**TINY)
    entries = list((tmp_path / "diffusion").glob("t2i-*"))
    assert len(entries) == 1 and (entries[0] / "settings.json").is_file()
    assert not list((tmp_path / "diffusion").glob(".*tmp"))
    b = load_or_train_text2image(**TINY)
    assert _same_weights(a.unet, b.unet) and _same_weights(a.text_encoder, b.text_encoder)
    assert a.scheduler_config == b.scheduler_config
    assert b.tokenizer.get_vocab() == a.tokenizer.get_vocab()
    assert torch.equal(a.tokenize(all_prompts()), b.tokenize(all_prompts()))
    assert torch.allclose(a.encode(all_prompts()), b.encode(all_prompts()))
    g = torch.Generator
    assert torch.allclose(a.generate("a handwritten two", steps=3, generator=g().manual_seed(1)),
                          b.generate("a handwritten two", steps=3, generator=g().manual_seed(1)),
                          atol=1e-5)

    # the second UNet: trained on the frozen encoder, cached, and sharing the encoder object
    before = {k: v.clone() for k, v in a.text_encoder.state_dict().items()}
    c = load_or_train_second_unet(a, **TINY)
    assert c.text_encoder is a.text_encoder and c.tokenizer is a.tokenizer
    assert all(torch.equal(before[k], v) for k, v in a.text_encoder.state_dict().items())
    assert not _same_weights(c.unet, a.unet)
    assert len(list((tmp_path / "diffusion").glob("t2i-*"))) == 2
    d = load_or_train_second_unet(a, **TINY)
    assert _same_weights(c.unet, d.unet) and d.text_encoder is a.text_encoder


def test_second_unet_leaves_encoder_unchanged(tiny_model):
    enc = tiny_model.text_encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    grads_before = [p.requires_grad for p in enc.parameters()]
    second = train_text2image(text_encoder=enc, tokenizer=tiny_model.tokenizer,
                              train_text_encoder=False, seed=1, **TINY)
    assert second.text_encoder is enc
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert [p.requires_grad for p in enc.parameters()] == grads_before
    assert all(p.grad is None for p in enc.parameters())
    # fine-tuning a given encoder works on a copy
    tuned = train_text2image(text_encoder=enc, tokenizer=tiny_model.tokenizer, **TINY)
    assert tuned.text_encoder is not enc
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert not _same_weights(tuned.text_encoder, enc)


def test_bad_input_raises(tiny_model):
    with pytest.raises(ValueError, match="digit"):
        digit_prompt(10)
    with pytest.raises(ValueError, match="digit"):
        digit_prompt("seven")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="style"):
        digit_prompt(3, "italic")
    with pytest.raises(ValueError, match="steps"):
        train_text2image(steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_text2image(steps=1, batch_size=0)
    with pytest.raises(ValueError, match="cfg_dropout"):
        train_text2image(steps=1, cfg_dropout=1.0)
    with pytest.raises(ValueError, match="text_encoder"):
        train_text2image(steps=1, train_text_encoder=False)
    with pytest.raises(ValueError, match="steps"):
        tiny_model.generate("a handwritten one", steps=0)
    with pytest.raises(ValueError, match="steps"):
        tiny_model.sampler(steps=-1)
    with pytest.raises(ValueError, match="prompts"):
        tiny_model.generate([], steps=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_model.generate("a handwritten one", steps=2, guidance_scale="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown"):
        load_or_train_text2image(cache=False, stepz=3)
