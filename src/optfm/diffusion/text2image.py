"""A tiny text-to-image model of scikit-learn's 8x8 digits (concept erasure, "Small reproduction").

Prompts are ``"a handwritten seven"`` or, with a style word, ``"a bold handwritten seven"`` /
``"a thin handwritten seven"`` (:func:`digit_prompt`). Styles are simple image transforms of the
real digit (grey-scale morphology with a 3x3 window on [−1, 1] images, blended half-and-half with
the original): ``bold`` = ½(x + max-pool(x)) (dilation, thicker strokes), ``thin`` =
½(x + min-pool(x)) (erosion, thinner strokes).

:class:`TextToImage` bundles

- ``tokenizer``: a word-level ``PreTrainedTokenizerFast`` (:func:`optfm.data.build_word_tokenizer`)
  over the prompt vocabulary plus ``[PAD] [UNK] [BOS] [EOS]``; every prompt is encoded as
  ``[BOS] words [EOS] [PAD]…`` padded/truncated to :data:`PROMPT_LENGTH` = 8 tokens;
- ``text_encoder``: ``transformers.CLIPTextModel`` from a small ``CLIPTextConfig`` (hidden 64,
  2 layers, 2 heads, ``max_position_embeddings`` = 8; pad/bos/eos ids from the tokenizer); the
  conditioning is its ``last_hidden_state`` ``(B, 8, 64)`` (no attention mask, as in Stable
  Diffusion: pad positions carry embeddings too);
- ``unet``: ``diffusers.UNet2DConditionModel`` (sample size 8, 1 channel, blocks (32, 64), cross
  attention on the 4x4 level and in the middle block, ``cross_attention_dim`` = 64);
- ``scheduler_config``: :data:`optfm.diffusion.DIGITS_SCHEDULER_CONFIG` (1000 steps, cosine betas,
  ε-prediction, no clipping) for ``DDPMScheduler``/``DDIMScheduler``.

:func:`train_text2image` minimises the ε-prediction loss ‖ε_θ(x_t, t, c) − ε‖² with the prompt
replaced by the empty prompt ``""`` with probability ``cfg_dropout`` (classifier-free guidance,
Ho & Salimans 2022); sampling uses ε̂ = ε_u + s (ε_c − ε_u) with ε_u from ``""``. UNet and text
encoder are trained jointly by default; with ``text_encoder=…, train_text_encoder=False`` a fresh
UNet is trained on that frozen encoder (the spec's plug-and-play "second UNet"); the given encoder
is used as is and never modified. Returned weights are EMAs of the trained weights.

:func:`load_or_train_text2image` / :func:`load_or_train_second_unet` cache under
``cache_dir()/diffusion/t2i-<hash>/`` (``unet/``, ``text_encoder/``, ``tokenizer/`` as
``save_pretrained`` folders, ``scheduler/scheduler_config.json``, ``settings.json``), written to a
temporary folder and renamed when complete.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from optfm.data.corpus import cache_dir
from optfm.data.digits import load_digits_split
from optfm.diffusion.sampler import DDIMSampler
from optfm.diffusion.train import DIGITS_SCHEDULER_CONFIG
from optfm.training.io import atomic_write_dir, atomic_write_json, read_json
from optfm.training.progress import progress
from optfm.training.seed import make_generator

__all__ = [
    "PROMPT_DIGITS",
    "PROMPT_LENGTH",
    "PROMPT_STYLES",
    "TextToImage",
    "all_prompts",
    "apply_style",
    "build_prompt_tokenizer",
    "digit_prompt",
    "digits_with_labels",
    "load_or_train_second_unet",
    "load_or_train_text2image",
    "text2image_cache_path",
    "tiny_text_encoder",
    "tiny_text_unet",
    "train_text2image",
]

_CACHE_VERSION = 1

#: Digit names used in prompts, index = digit.
PROMPT_DIGITS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                  "eight", "nine")
#: Optional style words (see :func:`apply_style`).
PROMPT_STYLES: tuple[str, ...] = ("bold", "thin")
#: Tokens per encoded prompt ([BOS] + words + [EOS], padded with [PAD]).
PROMPT_LENGTH = 8
_SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def digit_prompt(digit: int, style: str | None = None) -> str:
    """``"a handwritten seven"`` for ``digit=7``; ``"a bold handwritten seven"`` with a style."""
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}")
    if style is not None and style not in PROMPT_STYLES:
        raise ValueError(f"style must be None or one of {PROMPT_STYLES}, got {style!r}")
    words = ["a", *([style] if style else []), "handwritten", PROMPT_DIGITS[digit]]
    return " ".join(words)


def all_prompts() -> list[str]:
    """Every prompt the model is trained on: 10 digits x (no style, bold, thin), digit-major."""
    return [digit_prompt(d, s) for d in range(10) for s in (None, *PROMPT_STYLES)]


def apply_style(images: torch.Tensor, style: str | None) -> torch.Tensor:
    """The style transform on ``(B, 1, 8, 8)`` images in [−1, 1] (``None``: unchanged)."""
    if style is None:
        return images
    if style == "bold":
        return 0.5 * (images + F.max_pool2d(images, 3, stride=1, padding=1))
    if style == "thin":
        return 0.5 * (images - F.max_pool2d(-images, 3, stride=1, padding=1))
    raise ValueError(f"style must be None or one of {PROMPT_STYLES}, got {style!r}")


def build_prompt_tokenizer():
    """The word-level tokenizer over the prompt vocabulary (+ ``[PAD] [UNK] [BOS] [EOS]`` = ids
    0..3); encodes ``[BOS] words [EOS]``. Deterministic: same vocabulary on every call."""
    from tokenizers import processors

    from optfm.data.tokenizers import build_word_tokenizer

    tok = build_word_tokenizer(all_prompts(), special_tokens=_SPECIALS,
                               model_max_length=PROMPT_LENGTH)
    bos, eos = _SPECIALS[2], _SPECIALS[3]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tok.convert_tokens_to_ids(bos)), (eos, tok.convert_tokens_to_ids(eos))])
    return tok


def tiny_text_encoder(tokenizer, *, hidden_size: int = 64, num_hidden_layers: int = 2,
                      num_attention_heads: int = 2, intermediate_size: int = 128,
                      max_position_embeddings: int = PROMPT_LENGTH):
    """A small ``CLIPTextModel`` matching ``tokenizer`` (vocabulary, pad/bos/eos ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        projection_dim=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModel(cfg)


def tiny_text_unet(*, cross_attention_dim: int = 64,
                   block_out_channels: Sequence[int] = (32, 64)):
    """A small ``UNet2DConditionModel`` for 8x8 single-channel images with cross attention on the
    4x4 level and in the middle block."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, cross_attention_dim=cross_attention_dim, attention_head_dim=8)


def digits_with_labels(*, random_state: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training digits as ``(N, 1, 8, 8)`` float32 in [−1, 1] and their labels ``(N,)``."""
    data = load_digits_split(random_state=random_state, standardize=False)
    x = (data.x_train / 8.0 - 1.0).reshape(-1, 1, 8, 8).float()
    return x, torch.as_tensor(data.y_train).long()


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    return prompts


@dataclass
class TextToImage:
    """Tokenizer + CLIP text encoder + conditional UNet + noise schedule (see the module doc)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]

    @property
    def prompt_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``(B, L)``: ``[BOS] words [EOS]`` padded/truncated to L tokens."""
        enc = self.tokenizer(_prompt_list(prompts), padding="max_length", truncation=True,
                             max_length=self.prompt_length, return_tensors="pt")
        return enc["input_ids"]

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(B, L, H)`` (the encoder's ``last_hidden_state``). Differentiable
        w.r.t. the encoder's weights when grad is enabled."""
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    def sampler(self, steps: int = 50, eta: float = 0.0, guidance_scale: float | None = 3.0,
                **kw: Any) -> DDIMSampler:
        """A :class:`DDIMSampler` over this UNet and schedule (``kw``: its other options)."""
        _check_positive_int("steps", steps)
        return DDIMSampler(self.unet, self.scheduler_config, num_inference_steps=steps, eta=eta,
                           guidance_scale=guidance_scale, **kw)

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, steps: int = 50,
                 guidance_scale: float = 3.0, eta: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 1, 8, 8)`` for the prompts (classifier-free guidance with the empty
        prompt as unconditional embedding; ``guidance_scale=1``: conditional only)."""
        prompts = _prompt_list(prompts)
        _check_positive_int("steps", steps)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        sampler = self.sampler(steps, eta=eta, guidance_scale=guidance_scale,
                               gradient_checkpointing=False)
        cond = self.encode(prompts)
        uncond = self.encode([""])
        noise = sampler.randn_noise(len(prompts), generator=generator)
        return sampler.sample(noise.to(cond.device), encoder_hidden_states=cond,
                              negative_encoder_hidden_states=uncond)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``unet/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` under ``path``."""
        path = Path(path)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        atomic_write_json(path / "scheduler" / "scheduler_config.json",
                          {"_class_name": "DDPMScheduler", **self.scheduler_config})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextToImage:
        """Load what :meth:`save_pretrained` wrote (local files, safetensors); eval mode."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, PreTrainedTokenizerFast

        path = Path(path)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True,
                                                    use_safetensors=True)
        enc = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True,
                                            use_safetensors=True)
        tok = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer", local_files_only=True)
        cfg = dict(read_json(path / "scheduler" / "scheduler_config.json"))
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        return cls(tok, enc.eval(), unet.eval(), cfg)


def train_text2image(*, steps: int = 800, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, train_text_encoder: bool = True,
                     text_encoder: torch.nn.Module | None = None, tokenizer: Any = None,
                     cfg_dropout: float = 0.1, style_prob: float = 0.5,
                     ema_decay: float = 0.995, warmup_steps: int = 100,
                     losses: list[float] | None = None) -> TextToImage:
    """Train the text-to-image model (see the module docstring); returns it in eval mode.

    Each example is a random training digit; with probability ``style_prob`` a random style
    (``bold``/``thin``) is applied and named in the prompt; with probability ``cfg_dropout`` the
    prompt is replaced by ``""``. Optimiser: AdamW (``lr``, no weight decay) over the UNet (and
    the text encoder when ``train_text_encoder``), linear warm-up then cosine decay, grad-norm clip
    1.0, EMA weights (``ema_decay``; 0 disables). A given ``text_encoder`` is never modified: with
    ``train_text_encoder=True`` a copy is fine-tuned, otherwise it is used frozen and returned as
    is. ``tokenizer`` defaults to :func:`build_prompt_tokenizer`. If ``losses`` is a list, every
    step's loss is appended.
    """
    from diffusers import DDPMScheduler

    _check_positive_int("steps", steps)
    _check_positive_int("batch_size", batch_size)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0.0 <= cfg_dropout < 1.0:
        raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout!r}")
    if not 0.0 <= style_prob <= 1.0:
        raise ValueError(f"style_prob must be in [0, 1], got {style_prob!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if text_encoder is None and not train_text_encoder:
        raise ValueError("train_text_encoder=False needs a text_encoder (a frozen encoder to "
                         "train the UNet on)")

    tok = tokenizer if tokenizer is not None else build_prompt_tokenizer()
    gen = make_generator(seed)
    torch.manual_seed(seed)  # transformers/diffusers initialise weights from the global RNG
    if text_encoder is None:
        enc = tiny_text_encoder(tok)
    else:
        if text_encoder.config.vocab_size != len(tok):
            raise ValueError(f"text_encoder has vocab_size {text_encoder.config.vocab_size} but "
                             f"the tokenizer has {len(tok)} tokens")
        enc = copy.deepcopy(text_encoder) if train_text_encoder else text_encoder
    unet = tiny_text_unet(cross_attention_dim=int(enc.config.hidden_size))
    sched_cfg = dict(DIGITS_SCHEDULER_CONFIG)
    scheduler = DDPMScheduler.from_config(sched_cfg)
    bundle = TextToImage(tok, enc, unet, sched_cfg)

    # prompt table: row 3 d + s (s = 0 plain, 1 bold, 2 thin); last row = ""
    prompts = [*all_prompts(), ""]
    table_ids = bundle.tokenize(prompts)
    empty_row = len(prompts) - 1
    frozen_table = None
    if not train_text_encoder:
        with torch.no_grad():
            frozen_table = enc(input_ids=table_ids).last_hidden_state.detach()

    params = list(unet.parameters())
    if train_text_encoder:
        enc.train()
        params += list(enc.parameters())
    unet.train()
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False) if ema_decay > 0 else None
    ema_enc = (copy.deepcopy(enc).eval().requires_grad_(False)
               if ema_decay > 0 and train_text_encoder else None)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * frac)).item())

    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    x_all, y_all = digits_with_labels()
    n = x_all.shape[0]
    T = int(sched_cfg["num_train_timesteps"])
    bold = apply_style(x_all, "bold")
    thin = apply_style(x_all, "thin")
    variants = torch.stack([x_all, bold, thin])  # (3, N, 1, 8, 8)
    for _step in progress(range(steps), desc="train text-to-image", unit="step"):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        styled = torch.rand(batch_size, generator=gen) < style_prob
        style = torch.where(styled, torch.randint(1, 3, (batch_size,), generator=gen), 0)
        x0 = variants[style, idx]
        rows = 3 * y_all[idx] + style
        drop = torch.rand(batch_size, generator=gen) < cfg_dropout
        rows = torch.where(drop, empty_row, rows)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (batch_size,), generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        if frozen_table is not None:
            ehs = frozen_table[rows]
        else:
            # encode the distinct prompts once per step, then gather
            uniq, inv = torch.unique(rows, return_inverse=True)
            ehs = enc(input_ids=table_ids[uniq]).last_hidden_state[inv]
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=ehs).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched_lr.step()
        with torch.no_grad():
            for ema, model in ((ema_unet, unet), (ema_enc, enc if train_text_encoder else None)):
                if ema is not None and model is not None:
                    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                        pe.lerp_(p, 1.0 - ema_decay)
        if losses is not None:
            losses.append(float(loss.detach()))
    out_unet = (ema_unet if ema_unet is not None else unet).eval()
    if train_text_encoder:
        out_enc = (ema_enc if ema_enc is not None else enc).eval().requires_grad_(True)
        out_unet.requires_grad_(True)
    else:
        out_enc = text_encoder
        out_unet.requires_grad_(True)
    return TextToImage(tok, out_enc, out_unet, sched_cfg)


def _settings(kw: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    sig = inspect.signature(train_text2image)
    skip = {"losses", "text_encoder", "tokenizer"}
    settings = {k: p.default for k, p in sig.parameters.items() if k not in skip}
    unknown = set(kw) - set(settings)
    if unknown:
        raise TypeError(f"unknown training settings: {sorted(unknown)}")
    settings.update(kw)
    settings["cache_version"] = _CACHE_VERSION
    settings.update(extra or {})
    return settings


def text2image_cache_path(settings: dict[str, Any]) -> Path:
    """The cache folder for a settings dict (may not exist yet)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "diffusion" / f"t2i-{key}"


def _fingerprint(module: torch.nn.Module, tokenizer: Any) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _save_atomic(model: TextToImage, path: Path, settings: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        atomic_write_json(tmp / "settings.json", settings)

    atomic_write_dir(path, write)


def load_or_train_text2image(*, cache: bool = True, **kw: Any) -> TextToImage:
    """:func:`train_text2image` (jointly trained encoder + UNet) with a cache keyed by the
    settings. ``cache=False`` neither reads nor writes it."""
    if "text_encoder" in kw or "tokenizer" in kw or kw.get("train_text_encoder") is False:
        raise ValueError("load_or_train_text2image trains its own text encoder; use "
                         "load_or_train_second_unet for a UNet on a given encoder")
    settings = _settings(kw, {"kind": "joint"})
    path = text2image_cache_path(settings)
    if cache and (path / "settings.json").is_file():
        return TextToImage.from_pretrained(path)
    t0 = time.perf_counter()
    model = train_text2image(**kw)
    if cache:
        _save_atomic(model, path, {**settings, "train_time_s": time.perf_counter() - t0})
    return model


def load_or_train_second_unet(first: TextToImage, *, cache: bool = True,
                              **kw: Any) -> TextToImage:
    """A fresh UNet trained on ``first``'s frozen text encoder (plug-and-play check), cached by
    settings + a fingerprint of the encoder's weights and vocabulary. Default ``seed`` is 1 (a
    different initialisation from the first model). The result shares ``first.text_encoder`` and
    ``first.tokenizer`` (the very objects), also when loaded from the cache."""
    if "text_encoder" in kw or "tokenizer" in kw or "train_text_encoder" in kw:
        raise ValueError("load_or_train_second_unet takes the encoder from `first`")
    kw.setdefault("seed", 1)
    kw["train_text_encoder"] = False
    settings = _settings(kw, {"kind": "second_unet",
                              "encoder": _fingerprint(first.text_encoder, first.tokenizer)})
    path = text2image_cache_path(settings)
    if cache and (path / "settings.json").is_file():
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True,
                                                    use_safetensors=True)
        return TextToImage(first.tokenizer, first.text_encoder, unet.eval(),
                           dict(first.scheduler_config))
    t0 = time.perf_counter()
    model = train_text2image(text_encoder=first.text_encoder, tokenizer=first.tokenizer, **kw)
    if cache:
        _save_atomic(model, path, {**settings, "train_time_s": time.perf_counter() - t0})
    return model
