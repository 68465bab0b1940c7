"""The ``dp-text`` experiment: its smoke profile with the numbers checked, the public/private
separation of its data and tokenizer, its text processing, the cached base model, and the DP
fine-tuning paths it does not run in the smoke profile (Llama, full fine-tuning)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import optfm.experiments.dp_text as dp_text  # registers the experiment
from optfm.experiments import ConfigError, run_experiment
from optfm.experiments.config import apply_overrides
from optfm.privacy import epsilon_for
from optfm.training import read_json

DP_ARMS = ("eps8-dp-adam-doppler-lr0.003-s0", "eps8-dp-adam-disk-lr0.01-s0")
NONPRIVATE = "nonprivate-lr0.02-s0"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_experiment("dp-text", profile="smoke", out_root=tmp_path_factory.mktemp("runs"),
                          verbose=False)


@pytest.fixture(scope="module")
def smoke_config():
    return dp_text.DPText.config("smoke")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Secure RNG|Optimal order|fan_in_fan_out).*")
        yield


def _arm(run, key):
    return read_json(run / "arms" / f"{key}.json")["result"]


# ---------------------------------------------------------------- the smoke run

def test_every_arm_runs_and_its_metrics_are_in_range(run):
    keys = sorted(p.stem for p in (run / "arms").glob("*.json"))
    assert keys == sorted(["zero-shot", NONPRIVATE, *DP_ARMS])
    for key in keys:
        r = _arm(run, key)
        assert 0 <= r["bleu"] <= 100 and 0 <= r["val_bleu"] <= 100
        assert 0 <= r["rouge_l"] <= 1 and 0 <= r["slot_error"] <= 1
        assert 0 < r["test_nll"] < 10 and 0 < r["val_nll"] < 10
        assert r["unk_rate_private"] == 0  # delexicalised: no private token is unknown
        assert len(r["samples"]) == 3
        if key != "zero-shot":
            assert r["steps"] == 30 and len(r["loss_curve"]) >= 10
            assert all(math.isfinite(c[1]) for c in r["loss_curve"])
            # LoRA rank 8 on c_attn, c_proj (x2) and c_fc of 2 layers, hidden 32: frozen base
            assert r["trainable_params"] == 2 * 8 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))


def test_epsilon_is_the_accountants_for_the_sigma_used(run):
    n = _arm(run, "zero-shot")["n_private_pairs"]
    delta = 1 / n**1.1
    results = [_arm(run, k) for k in DP_ARMS]
    for r in results:
        assert r["delta"] == pytest.approx(delta)
        assert r["epsilon_spent"] <= 8.0 + 0.02          # calibration tolerance 0.01
        assert r["epsilon_spent"] > 7.8                   # and the budget is used
        assert r["epsilon_spent"] == pytest.approx(
            epsilon_for(r["noise_multiplier"], r["sample_rate"], r["steps"], delta, "prv"), rel=1e-9)
        assert 0.2 < r["noise_multiplier"] < 2.0
        assert r["mean_batch"] == pytest.approx(32, rel=0.25)  # Poisson, expected batch 32
    # the filters are post-processing: σ and ε do not depend on them
    assert results[0]["noise_multiplier"] == results[1]["noise_multiplier"]
    assert results[0]["epsilon_spent"] == results[1]["epsilon_spent"]
    assert _arm(run, NONPRIVATE)["noise_multiplier"] == 0


def test_fine_tuning_beats_the_zero_shot_floor(run):
    zs, npv = _arm(run, "zero-shot"), _arm(run, NONPRIVATE)
    # measured: BLEU 0.002 -> 21.3, NLL 2.33 -> 1.35
    assert zs["bleu"] < 2 and zs["slot_error"] > 0.8
    assert npv["bleu"] > zs["bleu"] + 10
    assert npv["test_nll"] < zs["test_nll"] - 0.5
    assert npv["final_train_loss"] < npv["loss_curve"][0][1] - 0.5
    for key in DP_ARMS:  # measured NLL 1.45 (DiSK) and 1.73 (DOPPLER)
        r = _arm(run, key)
        assert r["test_nll"] < zs["test_nll"] - 0.3
        assert r["test_nll"] > npv["test_nll"] - 0.05  # privacy costs utility here


def test_summary_metrics_and_figure(run):
    summary = (run / "summary.md").read_text()
    for label in ("base model, zero-shot", "Adam, non-private", "DP-Adam + DOPPLER (a9b1)",
                  "DP-Adam + DiSK (κ=0.7, γ=0.5)", "## Sample outputs"):
        assert label in summary
    assert "| 8 | DP-Adam + DiSK (κ=0.7, γ=0.5) | 0.01 |" in summary
    m = read_json(run / "metrics.json")
    assert m["bleu_nonprivate"] == pytest.approx(_arm(run, NONPRIVATE)["bleu"])
    assert m["epsilon_spent_eps8_dp-adam-disk"] <= 8.02
    assert m["lr_eps8_dp-adam-doppler"] == 0.003
    assert m["delta"] == pytest.approx(1 / m["n_private_pairs"] ** 1.1)
    assert (run / "dp-text.png").stat().st_size > 1000


def test_base_model_is_cached_and_reloaded_identically(run, smoke_config):
    from optfm.data.corpus import cache_dir

    path = cache_dir() / "dp-text" / dp_text._base_key(smoke_config)
    assert (path / "settings.json").is_file()
    assert list((path / "model").glob("*.safetensors"))
    world = dp_text.make_world(smoke_config)
    in_memory, _ = dp_text.load_or_pretrain_base(smoke_config, world)
    dp_text._BASES.clear()  # force a read from disk
    from_disk, meta = dp_text.load_or_pretrain_base(smoke_config, world)
    assert meta["steps"] > 0 and len(meta["epoch_losses"]) == smoke_config.pretrain_epochs
    for (k, a), (_, b) in zip(in_memory.state_dict().items(), from_disk.state_dict().items()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------- data, tokenizer, text

def test_public_data_and_tokenizer_never_see_private_text(smoke_config):
    from optfm.data.e2e import make_e2e

    world = dp_text.make_world(smoke_config)
    private = make_e2e(smoke_config.n_private_mrs, seed=smoke_config.data_seed)
    public = make_e2e(smoke_config.n_public_mrs, seed=smoke_config.data_seed + 1)
    private_mrs = {ex.mr for ex in private.train + private.validation + private.test}
    assert not private_mrs & {ex.mr for ex in public.train + public.validation + public.test}
    # every vocabulary entry comes from the public documents or the public schema
    pre = world["tokenizer"].backend_tokenizer.pre_tokenizer
    public_tokens = {w for text in world["public_docs"] + dp_text._schema_texts()
                     for w, _ in pre.pre_tokenize_str(text)}
    vocab = set(world["tokenizer"].get_vocab()) - set(world["tokenizer"].all_special_tokens)
    assert vocab <= public_tokens
    # no private reference is among the public documents, and the prompt format is unseen there
    private_refs = {r for ex in private.train for r in ex.references}
    assert not private_refs & set(world["public_docs"])
    assert not any(dp_text.SEPARATOR in d for d in world["public_docs"])


def test_without_delexicalisation_unseen_names_become_unknown(smoke_config):
    world = dp_text.make_world(dataclasses.replace(smoke_config, delexicalise=False))
    assert world["unk_rate_private"] > 0.005  # invented names outside the public vocabulary


def test_detokenize_and_relexicalise_invert_the_pipeline(smoke_config):
    from optfm.data.e2e import make_e2e, parse_mr

    world = dp_text.make_world(smoke_config)
    tok = world["tokenizer"]
    checked = 0
    for ex in make_e2e(smoke_config.n_private_mrs, seed=smoke_config.data_seed).train:
        slots = parse_mr(ex.mr)
        d = dp_text.delexicalise(ex)
        assert "XNAME" in d.mr and slots["name"] not in d.mr
        for ref, dref in zip(ex.references, d.references):
            assert "XNAME" in dref  # every reference realises the name verbatim
            decoded = tok.decode(tok(dref, add_special_tokens=False)["input_ids"],
                                 skip_special_tokens=True)
            assert dp_text.relexicalise(dp_text.detokenize(decoded), slots) == ref
            checked += 1
    assert checked > 400


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("override, match", [
    ("methods=sgd", "methods"),
    ("epsilons=-1", "epsilons"),
    ("batch_size=8", "batch_size"),
    ("hidden=30", "multiple of heads"),
    ("doppler_lrs=", "doppler_lrs"),
    ("disk_lrs=0.01,0.01", "disk_lrs"),
    ("arch=bert", "arch"),
    ("finetune=half", "finetune"),
    ("n_private_mrs=5", "n_private_mrs"),
])
def test_bad_config_values_raise_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(dp_text.DPText.config("quick"), [override])


def test_profiles_validate_and_arms_are_unique():
    for profile in ("smoke", "quick", "full"):
        cfg = dp_text.DPText.config(profile)
        keys = [a.key for a in dp_text.DPText().arms(cfg)]
        assert len(keys) == len(set(keys)) and keys[0] == "zero-shot"
    quick = dp_text.DPText.config("quick")
    assert quick.epsilons == (3.0, 8.0) and set(quick.methods) == set(dp_text.METHODS)
    assert quick.n_seeds >= 3 and quick.arch == "gpt2"


# ---------------------------------------------------------------- paths the smoke run skips

@pytest.mark.parametrize("arch, finetune, method", [
    ("llama", "lora", "dp-adam-disk"),
    ("gpt2", "full", "dp-adam-doppler"),
])
def test_fine_tune_other_architectures_and_full_fine_tuning(smoke_config, arch, finetune, method):
    cfg = apply_overrides(smoke_config, [f"arch={arch}", f"finetune={finetune}", "steps=4"])
    world = dp_text.make_world(cfg)
    torch.manual_seed(0)
    base = dp_text._new_model(cfg, world["tokenizer"], world["n_positions"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = dp_text.fine_tune(cfg, world, base, method=method, lr=1e-2, epsilon=8.0, seed=0)
    total = sum(p.numel() for p in base.parameters())
    if finetune == "full":
        assert res["trainable_params"] == total  # tied GPT-2 embeddings counted once
    else:
        assert 0 < res["trainable_params"] < total / 2  # LoRA adapters only
    assert res["steps"] == 4 and all(math.isfinite(x) for x in res["losses"])
    assert res["epsilon_spent"] == pytest.approx(epsilon_for(
        res["noise_multiplier"], res["sample_rate"], 4, res["delta"], "prv"), rel=1e-9)
    assert res["epsilon_spent"] <= 8.02
    for k, v in base.state_dict().items():  # the base model itself is never modified
        assert torch.equal(v, before[k]), k
    scores = dp_text.evaluate(res["model"], world, cfg)
    assert 0 <= scores["bleu"] <= 100 and math.isfinite(scores["test_nll"])
