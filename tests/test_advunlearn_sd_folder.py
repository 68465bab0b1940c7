"""The scale-up path of AdvUnlearn: tiny random-config components of the Stable Diffusion classes
(``CLIPTokenizer`` with a small BPE vocabulary written here, ``CLIPTextModel``,
``UNet2DConditionModel`` with 4 latent channels, ``DDIMScheduler`` with SD's schedule) saved in
the SD folder layout (``tokenizer/``, ``text_encoder/``, ``unet/``, ``scheduler/``), loaded back
with ``from_pretrained(path, subfolder=..., local_files_only=True)``, then 2 AdvUnlearn
iterations (warm-up 1: the second one attacks) and 2 ESD-x iterations. No VAE: the ESD loss
works in latent space. Offline, < 30 s."""

import json

import pytest
import torch

from optfm.unlearning.advunlearn import (
    ESD,
    AdvUnlearn,
    AdvUnlearnConfig,
    ESDConfig,
    encode_with_soft_prompt,
    partial_sample,
    tokenize_prompts,
)

WORDS = ("a", "photo", "of", "nudity", "cat", "dog", "car", "tree", "painting", "van", "gogh",
         "style", "the")
MAX_LEN = 16  # Stable Diffusion: 77
HIDDEN = 32  # Stable Diffusion v1: 768
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "prediction_type": "epsilon"}


def _write_bpe(directory):
    """A tiny CLIP BPE vocabulary (characters, end-of-word characters, merges spelling WORDS)."""
    chars = sorted(set("".join(WORDS)))
    vocab = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in WORDS:
        parts = [*w[:-1], w[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory / "vocab.json", directory / "merges.txt"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd")
    bpe = tmp_path_factory.mktemp("bpe")
    tok = CLIPTokenizer(*map(str, _write_bpe(bpe)), model_max_length=MAX_LEN)
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, projection_dim=HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_LEN,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        cross_attention_dim=HIDDEN, attention_head_dim=8)
    tok.save_pretrained(root / "tokenizer")
    enc.save_pretrained(root / "text_encoder")
    unet.save_pretrained(root / "unet")
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(root / "scheduler")
    return root


def _load(root):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    enc = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
    sched = DDIMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    return tok, enc, unet, sched


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def test_layout_loads_and_shapes(sd_folder):
    for sub in ("tokenizer", "text_encoder", "unet", "scheduler"):
        assert (sd_folder / sub).is_dir()
    tok, enc, unet, sched = _load(sd_folder)
    assert type(tok).__name__.startswith("CLIPTokenizer") and tok.model_max_length == MAX_LEN
    ids = tokenize_prompts(tok, ["a photo of nudity", "a van gogh style painting"],
                           max_length=MAX_LEN)
    assert ids.shape == (2, MAX_LEN)
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[:, -1] == tok.eos_token_id).all()
    with torch.no_grad():
        plain = encode_with_soft_prompt(enc, ids)
        ref = enc(input_ids=ids).last_hidden_state
        soft = encode_with_soft_prompt(enc, ids, torch.randn(1, HIDDEN))
        x_t, t = partial_sample(unet, sched, plain, plain[:1] * 0, steps=4, stop_index=2,
                                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(plain, ref, atol=1e-5)
    assert soft.shape == plain.shape == (2, MAX_LEN, HIDDEN)
    assert x_t.shape == (2, 4, 8, 8) and torch.isfinite(x_t).all()
    ref_sched = type(sched).from_config(sched.config)
    ref_sched.set_timesteps(4)
    assert int(t) == int(ref_sched.timesteps[2])


def test_advunlearn_on_sd_folder(sd_folder):
    tok, enc, unet, sched = _load(sd_folder)
    enc0, unet0 = _snapshot(enc), _snapshot(unet)
    cfg = AdvUnlearnConfig("a photo of nudity", ["a photo of a cat", "a photo of a dog",
                                                 "a photo of a tree"],
                           gamma=0.3, lr=1e-3, warmup=1, ddim_steps=4, retain_batch_size=2,
                           attack_steps=3, attack_lr=1e-2)
    trainer = AdvUnlearn(enc, tok, unet, sched, cfg)
    hist = trainer.train(2)
    assert trainer.max_length == MAX_LEN
    assert hist[0]["attack_loss"] is None and hist[1]["attack_loss"] is not None
    for h in hist:
        for key in ("loss", "unlearn_loss", "utility_loss"):
            assert torch.isfinite(torch.tensor(h[key]))
    assert trainer.attack.previous.shape == (1, HIDDEN)
    changed = _changed(enc0, enc)
    assert changed and changed <= set(trainer.trainable_names)
    assert all("encoder.layers." in n or "final_layer_norm" in n for n in changed)
    assert not _changed(unet0, unet)


def test_esd_x_on_sd_folder(sd_folder):
    tok, enc, unet, sched = _load(sd_folder)
    enc0, unet0 = _snapshot(enc), _snapshot(unet)
    trainer = ESD(enc, tok, unet, sched, ESDConfig("a photo of nudity", lr=1e-3, ddim_steps=4))
    hist = trainer.train(2)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    changed = _changed(unet0, unet)
    assert changed and changed <= set(trainer.trainable_names)
    assert all(".attn2." in n for n in changed)
    assert not _changed(enc0, enc)
