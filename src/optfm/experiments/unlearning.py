"""``unlearning``: NGDiff against GA, GradDiff, NPO and SimNPO on TinyTOFU (specs/unlearning.md).

Per seed (a seed fixes the generated world, the model initialisation and the data order):

1. Generate TinyTOFU (fictitious authors with QA, paraphrased and perturbed answers, biographies;
   real-author and world-fact utility sets; holdout authors) and train a word-level tokenizer.
2. Train the **target** model (a tiny ``LlamaForCausalLM`` from config) on every author's QA and
   biography plus the utility sets until it memorises them, and the **retain** model on the same
   minus the forget authors (the "retrained from scratch" reference that forget quality and
   PrivLeak need). Both are cached in ``$OPTFM_CACHE/unlearning/`` keyed by everything that
   determines them, so repeated runs do not retrain.
3. Unlearn the forget split from a copy of the target model with every method at the same budget
   (steps, forget/retain batch sizes, AdamW), sweeping the lr for GradDiff and NGDiff, and
   evaluating every ``eval_every`` steps: forget quality (KS p-value of truth ratios against the
   retain model), model utility (harmonic mean of nine statistics), forget-set ROUGE-L and answer
   probability, VerbMem/KnowMem, PrivLeak (Min-K%, K = 40%) and a degeneracy check.

Figures: forget quality vs model utility (final point per method and lr), CE_F/CE_R trajectories,
and lr sensitivity of GradDiff and NGDiff.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from optfm.experiments.base import Arm, Experiment, Outcome, RunContext, pyplot, register
from optfm.experiments.config import ConfigError, ExperimentConfig
from optfm.experiments.stats import mean_se
from optfm.training.progress import progress

__all__ = ["UnlearningExperiment", "UnlearningExperimentConfig", "base_models"]

METHOD_NAMES = ("ga", "grad_diff", "npo", "simnpo", "ngdiff", "ngdiff_autolr")
_BASE_VERSION = 2  # bump when base-model training changes, to invalidate the cache
LABELS = {"ga": "GA", "grad_diff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO",
          "ngdiff": "NGDiff", "ngdiff_autolr": "NGDiff+AutoLR"}
COLORS = {"ga": "tab:red", "grad_diff": "tab:orange", "npo": "tab:green", "simnpo": "tab:olive",
          "ngdiff": "tab:blue", "ngdiff_autolr": "tab:purple"}


@dataclass
class UnlearningExperimentConfig(ExperimentConfig):
    # data (TinyTOFU)
    n_authors: int = 50
    n_holdout: int = 10
    split: str = "forget10"
    # model: tiny Llama from config
    hidden_size: int = 96
    intermediate_size: int = 256
    layers: int = 2
    heads: int = 4
    # base (target / retain) training
    base_epochs: int = 25
    base_lr: float = 3e-3
    base_batch_size: int = 32
    # unlearning
    methods: tuple[str, ...] = METHOD_NAMES
    lr: float = 3e-4  # methods that are not swept
    sweep_methods: tuple[str, ...] = ("grad_diff", "ngdiff")
    sweep_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    steps: int = 40
    batch_size: int = 8
    eval_every: int = 10
    autolr_period: int = 4
    n_seeds: int = 2
    max_new_tokens: int = 24

    def validate(self) -> None:
        super().validate()
        for m in (*self.methods, *self.sweep_methods):
            if m not in METHOD_NAMES:
                raise ConfigError(f"methods: {m!r} is not one of {', '.join(METHOD_NAMES)}")
        for key in ("n_authors", "n_holdout", "hidden_size", "intermediate_size", "layers",
                    "heads", "base_epochs", "base_batch_size", "steps", "batch_size",
                    "eval_every", "autolr_period", "n_seeds", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be divisible by heads "
                              f"({self.heads})")
        for key in ("lr", "base_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if not self.sweep_lrs or any(lr <= 0 for lr in self.sweep_lrs):
            raise ConfigError(f"sweep_lrs must be non-empty and > 0, got {self.sweep_lrs}")


# --------------------------------------------------------------------------- data and base models
def make_world(config: UnlearningExperimentConfig, seed: int):
    """(TinyTOFU data, word tokenizer trained on all of its text) for one seed."""
    from optfm.data import build_word_tokenizer
    from optfm.data.tofu import make_tinytofu, vocabulary_texts

    data = make_tinytofu(n_authors=config.n_authors, n_holdout=config.n_holdout,
                         forget_fraction=config.split, seed=seed)
    tok = build_word_tokenizer(vocabulary_texts(data), model_max_length=256)
    return data, tok


def paraphrase_pairs(data) -> list[tuple[str, str]]:
    """(question, paraphrased answer) of the retain authors outside ``retain_eval``.

    TOFU's models already know English, so a paraphrase is plausible to them; ours know only what
    they are trained on. Both base models therefore also learn the paraphrase templates, from
    authors that are neither forgotten nor used for evaluation, so that truth ratios compare
    knowledge of the value rather than familiarity with a sentence template."""
    held = {qa.author for qa in data.retain_eval}
    return [(qa.question, qa.paraphrased_answer) for qa in data.retain
            if qa.author not in held and qa.paraphrased_answer]


def _new_model(config: UnlearningExperimentConfig, tok, seed: int):
    from optfm.models.factories import tiny_llama

    torch.manual_seed(seed)
    return tiny_llama(vocab_size=len(tok), hidden_size=config.hidden_size,
                      intermediate_size=config.intermediate_size,
                      num_hidden_layers=config.layers, num_attention_heads=config.heads,
                      max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)


def train_lm(model, tok, pairs: list[tuple[str, str]], *, epochs: int, lr: float,
             batch_size: int, seed: int, desc: str = "base") -> list[float]:
    """Fine-tune ``model`` on (prompt, answer) pairs (answer tokens only; prompt "" = a document)
    with AdamW, 5% warm-up and cosine decay; return the mean loss of each epoch."""
    from optfm.pretraining.recipe import warmup_cosine
    from optfm.training.lm import encode_pairs, lm_loss

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total = epochs * steps_per_epoch
    sched = warmup_cosine(opt, warmup_steps=max(1, total // 20), total_steps=total)
    model.train()
    losses = []
    for _ in progress(range(epochs), desc=desc, leave=False):
        perm = torch.randperm(len(pairs), generator=gen).tolist()
        tot = 0.0
        for b in range(0, len(perm), batch_size):
            idx = perm[b: b + batch_size]
            batch = encode_pairs(tok, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx])
            loss = lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        losses.append(tot / len(pairs))
    return losses


def _base_key(config: UnlearningExperimentConfig, seed: int) -> str:
    fields = {k: getattr(config, k) for k in (
        "n_authors", "n_holdout", "split", "hidden_size", "intermediate_size", "layers", "heads",
        "base_epochs", "base_lr", "base_batch_size")}
    blob = json.dumps({"v": _BASE_VERSION, "seed": seed, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_models(config: UnlearningExperimentConfig, seed: int) -> dict[str, Any]:
    """Data, tokenizer, and the trained target and retain models for ``seed`` (cached)."""
    from optfm.data.corpus import cache_dir
    from optfm.data.tofu import retain_corpus, target_corpus
    from optfm.training.checkpoint import load_checkpoint, save_checkpoint
    from optfm.training.io import atomic_write_json, read_json

    data, tok = make_world(config, seed)
    root = cache_dir() / "unlearning" / _base_key(config, seed)
    out: dict[str, Any] = {"data": data, "tokenizer": tok, "root": root}
    for which, corpus in (("target", target_corpus), ("retain", retain_corpus)):
        model = _new_model(config, tok, seed)
        path = root / f"{which}.safetensors"
        meta_path = root / f"{which}.json"
        if path.is_file() and meta_path.is_file():
            load_checkpoint(path, model=model, restore_rng=False)
            meta = read_json(meta_path)
        else:
            c = corpus(data)
            pairs = [*c.qa, *paraphrase_pairs(data), *(("", doc) for doc in c.documents)]
            losses = train_lm(model, tok, pairs, epochs=config.base_epochs, lr=config.base_lr,
                              batch_size=config.base_batch_size, seed=seed, desc=which)
            root.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, model=model, save_rng=False)
            meta = {"epoch_losses": losses, "n_pairs": len(pairs)}
            atomic_write_json(meta_path, meta)
        model.eval()
        out[which] = model
        out[f"{which}_meta"] = meta
    return out


# --------------------------------------------------------------------------- evaluation
def evaluate(model, tok, data, *, reference: dict[str, Any] | None,
             max_new_tokens: int) -> dict[str, Any]:
    """TOFU + MUSE metrics of ``model`` (flat numbers); ``reference`` = the retain model's own
    evaluation (its forget truth ratios for forget quality, its Min-K% AUC for PrivLeak)."""
    from optfm.unlearning import metrics as M

    ev = M.tofu_eval(model, tok, forget=data.forget, retain=data.retain_eval,
                     real_authors=data.real_authors, world_facts=data.world_facts,
                     retain_model_R=None if reference is None else reference["forget_R"],
                     max_new_tokens=max_new_tokens)
    mu = M.muse_eval(model, tok, verbmem=data.verbmem or None,
                     knowmem_forget=data.knowmem_forget or None,
                     knowmem_retain=data.knowmem_retain or None,
                     forget_texts=_qa_docs(data.forget), holdout_texts=_qa_docs(data.holdout),
                     auc_retrain=None if reference is None else reference["auc"],
                     verbmem_max_new_tokens=max_new_tokens, knowmem_max_new_tokens=max_new_tokens)
    fq = ev.get("forget_quality")
    out = {
        "forget_quality": fq,
        "log10_forget_quality": None if fq is None else math.log10(max(fq, 1e-300)),
        "forget_ks_statistic": ev.get("forget_ks_statistic"),
        "model_utility": ev["model_utility"],
        "forget_truth_ratio": ev["forget_truth_ratio"],
        "forget_prob": ev["forget_answer_prob"],
        "forget_rouge": ev["forget_rougeL_recall"],
        "retain_prob": ev["retain_answer_prob"],
        "retain_rouge": ev["retain_rougeL_recall"],
        "retain_truth_ratio": ev["retain_truth_ratio"],
        "repetition": ev["forget_repetition_rate"],
        "verbmem": mu.get("verbmem_rougeL_f1"),
        "knowmem_forget": mu.get("knowmem_forget_rougeL_recall"),
        "knowmem_retain": mu.get("knowmem_retain_rougeL_recall"),
        "auc": mu["mink_auc"],
        "privleak": mu.get("privleak"),
        "forget_R": [float(x) for x in ev["forget_truth_ratios"]],
    }
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in out.items()}


def _qa_docs(qas) -> list[str]:
    """Question + answer as one document: the Min-K% membership texts (forget vs holdout QA)."""
    return [f"{q.question} {q.answer}" for q in qas]


def base_eval(config: UnlearningExperimentConfig, base: dict[str, Any], which: str
              ) -> dict[str, Any]:
    """Evaluation of the ``"retain"`` or ``"target"`` base model (the target's against the
    retain model's), cached next to the base models: it is deterministic."""
    from optfm.training.io import atomic_write_json, read_json

    path = base["root"] / f"{which}_eval_t{config.max_new_tokens}.json"
    if path.is_file():
        return read_json(path)
    ref = None if which == "retain" else base_eval(config, base, "retain")
    ev = evaluate(base[which], base["tokenizer"], base["data"], reference=ref,
                  max_new_tokens=config.max_new_tokens)
    atomic_write_json(path, ev)
    return ev


# --------------------------------------------------------------------------- the experiment
def _arm_lrs(config: UnlearningExperimentConfig, method: str) -> list[float]:
    return list(config.sweep_lrs) if method in config.sweep_methods else [config.lr]


def _rep_lr(config: UnlearningExperimentConfig, method: str) -> float:
    """The lr whose trajectory represents ``method`` in the figures (``config.lr`` if swept)."""
    lrs = _arm_lrs(config, method)
    return config.lr if config.lr in lrs else lrs[len(lrs) // 2]


@register
class UnlearningExperiment(Experiment):
    name = "unlearning"
    description = ("NGDiff vs GA/GradDiff/NPO/SimNPO on generated TinyTOFU: forget quality vs "
                   "model utility, CE trajectories, lr sensitivity.")
    config_cls = UnlearningExperimentConfig
    minutes = {"smoke": 0.3, "quick": 6.0, "full": 45.0}

    @classmethod
    def profiles(cls) -> dict[str, UnlearningExperimentConfig]:
        return {
            "smoke": UnlearningExperimentConfig(
                n_authors=12, n_holdout=4, split="forget10", hidden_size=48,
                intermediate_size=96, base_epochs=15, steps=6, eval_every=3, n_seeds=1,
                lr=1e-3, sweep_lrs=(1e-3,), methods=("ga", "npo", "ngdiff", "ngdiff_autolr"),
                sweep_methods=("ngdiff",), max_new_tokens=16),
            "quick": UnlearningExperimentConfig(),
            "full": UnlearningExperimentConfig(
                n_authors=100, split="forget05", base_epochs=30, steps=60, eval_every=10,
                n_seeds=5, sweep_lrs=(3e-5, 1e-4, 3e-4, 1e-3, 3e-3)),
        }

    def arms(self, config: UnlearningExperimentConfig) -> list[Arm]:
        arms = []
        for i in range(config.n_seeds):
            seed = config.seed + i
            arms.append(Arm(f"base-s{seed}", {"kind": "base", "seed": seed}))
            for m in config.methods:
                for lr in _arm_lrs(config, m):
                    key = (f"{m}-lr{lr:g}-s{seed}" if m in config.sweep_methods
                           else f"{m}-s{seed}")
                    arms.append(Arm(key, {"kind": "unlearn", "method": m, "lr": lr, "seed": seed}))
        return arms

    def run_arm(self, config: UnlearningExperimentConfig, arm: Arm, ctx: RunContext
                ) -> dict[str, Any]:
        seed = arm.params["seed"]
        base = base_models(config, seed)
        data = base["data"]
        ref = base_eval(config, base, "retain")
        if arm.params["kind"] == "base":
            target = base_eval(config, base, "target")
            return {"target": target, "retain": ref,
                    "target_epoch_losses": base["target_meta"]["epoch_losses"],
                    "retain_epoch_losses": base["retain_meta"]["epoch_losses"],
                    "n_forget": len(data.forget), "n_retain": len(data.retain)}
        return self._unlearn(config, arm, base, ref)

    def _unlearn(self, config, arm: Arm, base: dict[str, Any], ref: dict[str, Any]
                 ) -> dict[str, Any]:
        from optfm.unlearning import Unlearner

        method, lr, seed = arm.params["method"], arm.params["lr"], arm.params["seed"]
        data, tok = base["data"], base["tokenizer"]
        model = copy.deepcopy(base["target"])
        evals: list[dict[str, Any]] = []

        def callback(step: int, record: dict) -> None:
            if step % config.eval_every == 0 or step == config.steps:
                e = evaluate(model, tok, data, reference=ref, max_new_tokens=config.max_new_tokens)
                e.pop("forget_R")
                evals.append({"step": step, **e})

        un = Unlearner(model, tok, data.forget, data.retain,
                       method="ngdiff" if method == "ngdiff_autolr" else method,
                       auto_lr=method == "ngdiff_autolr", auto_lr_period=config.autolr_period,
                       steps=config.steps, lr=lr, batch_size=config.batch_size, seed=seed,
                       callback=callback)
        e0 = {k: v for k, v in base_eval(config, base, "target").items() if k != "forget_R"}
        evals.insert(0, {"step": 0, **e0})
        try:
            history = un.train()
            diverged = None
        except FloatingPointError as err:  # reported, not hidden: a diverged arm is a result
            history, diverged = un.history, str(err)
        out = {"method": method, "lr": lr, "seed": seed, "history": history, "evals": evals,
               "final": evals[-1], "diverged": diverged}
        if un.auto_lr is not None:
            probes = un.auto_lr.history
            out["autolr"] = {"probes": len(probes), "accepted": sum(p.accepted for p in probes),
                             "final_lr": un.auto_lr.lr,
                             "fitted": [p.fitted_lr if p.accepted else None for p in probes]}
        return out

    def finalize(self, config: UnlearningExperimentConfig, results: dict[str, dict[str, Any]],
                 ctx: RunContext) -> Outcome:
        arms = self.arms(config)
        bases = [results[a.key] for a in arms if a.params["kind"] == "base"]
        groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
        for a in arms:
            if a.params["kind"] == "unlearn":
                groups[(a.params["method"], a.params["lr"])].append(results[a.key])
        metrics: dict[str, float] = {}
        for which in ("target", "retain"):
            for k in ("model_utility", "log10_forget_quality", "forget_rouge", "privleak"):
                vals = [b[which][k] for b in bases if b[which].get(k) is not None]
                if vals:
                    metrics[f"{which}_{k}"] = mean_se(vals)[0]

        def stat(rs: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
            vals = [r["final"][key] for r in rs if r["final"].get(key) is not None]
            return mean_se(vals) if vals else None

        def cell(v: tuple[float, float] | None, digits: int = 3) -> str:
            return "—" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"

        cols = [("log10_forget_quality", "log10 FQ ↑", 2), ("model_utility", "MU ↑", 3),
                ("forget_rouge", "forget ROUGE-L ↓", 3), ("forget_prob", "forget P(a) ↓", 3),
                ("verbmem", "VerbMem ↓", 3), ("knowmem_retain", "KnowMem retain ↑", 3),
                ("privleak", "PrivLeak (→0)", 1), ("repetition", "repetition ↓", 3)]
        rows = ["| method | lr | " + " | ".join(c[1] for c in cols) + " | ΔCE_F | ΔCE_R | diverged |",
                "|---|---|" + "---|" * len(cols) + "---|---|---|"]
        ref_rows = []
        for which, label in (("target", "target (before unlearning)"),
                             ("retain", "retain model (ideal)")):
            vals = [cell(mean_se([b[which][k] for b in bases])
                         if all(b[which].get(k) is not None for b in bases) else None, d)
                    for k, _, d in cols]
            ref_rows.append(f"| {label} | — | " + " | ".join(vals) + " | — | — | — |")
        rows.extend(ref_rows)
        for (m, lr), rs in sorted(groups.items(), key=lambda kv: (METHOD_NAMES.index(kv[0][0]),
                                                                   kv[0][1])):
            d_f = mean_se([r["history"][-1]["ce_f"] - r["history"][0]["ce_f"] for r in rs
                           if r["history"]])
            d_r = mean_se([r["history"][-1]["ce_r"] - r["history"][0]["ce_r"] for r in rs
                           if r["history"]])
            n_div = sum(r["diverged"] is not None for r in rs)
            rows.append(f"| {LABELS[m]} | {lr:g} | "
                        + " | ".join(cell(stat(rs, k), d) for k, _, d in cols)
                        + f" | {d_f[0]:+.2f} ± {d_f[1]:.2f} | {d_r[0]:+.2f} ± {d_r[1]:.2f} | "
                        f"{n_div}/{len(rs)} |")
            tag = f"{m}_lr{lr:g}"
            for k, _, _ in cols:
                v = stat(rs, k)
                if v is not None:
                    metrics[f"{tag}_{k}"] = v[0]
            metrics[f"{tag}_delta_ce_f"] = d_f[0]
            metrics[f"{tag}_delta_ce_r"] = d_r[0]

        figs = [self._plot_tradeoff(config, groups, bases, ctx),
                self._plot_trajectories(config, groups, ctx),
                self._plot_lr(config, groups, ctx)]
        checks = self._claims(config, groups, bases, metrics)
        n_forget = bases[0]["n_forget"]
        summary = [
            f"TinyTOFU with {config.n_authors} authors, split {config.split} "
            f"({n_forget} forget QA, {bases[0]['n_retain']} retain QA), {config.n_holdout} "
            f"holdout authors; tiny Llama d={config.hidden_size}, {config.layers} layers; base "
            f"models trained {config.base_epochs} epochs at lr {config.base_lr:g}. Unlearning: "
            f"{config.steps} steps of AdamW, forget batch = retain batch = {config.batch_size}, "
            f"lr {config.lr:g} (swept for {', '.join(LABELS[m] for m in config.sweep_methods)}: "
            f"{', '.join(f'{x:g}' for x in config.sweep_lrs)}); AutoLR every "
            f"{config.autolr_period} steps on the retain loss. {config.n_seeds} seed(s) "
            f"({config.seed}..{config.seed + config.n_seeds - 1}); mean ± standard error.",
            "",
            "Base models (final training loss per pair, nats/token): target "
            + ", ".join(f"{b['target_epoch_losses'][-1]:.3f}" for b in bases)
            + "; retain " + ", ".join(f"{b['retain_epoch_losses'][-1]:.3f}" for b in bases) + ".",
            "",
            *rows,
            "",
            "FQ = forget quality (KS p-value of forget-set truth ratios against the retain "
            "model's); MU = model utility (harmonic mean of nine statistics); ΔCE = last minus "
            "first step of the training-batch losses.",
            "",
            "### Claims",
            "",
            *checks,
            "",
            *(f"![{name}]({name})" for name in figs),
        ]
        return Outcome(metrics=metrics, summary="\n".join(summary))

    # -- claims and figures -----------------------------------------------------------------
    def _claims(self, config, groups, bases, metrics) -> list[str]:
        out = []
        target_mu = mean_se([b["target"]["model_utility"] for b in bases])[0]
        for (m, lr), rs in sorted(groups.items()):
            if m not in ("ngdiff", "ngdiff_autolr"):
                continue
            rises = [r["history"][-1]["ce_f"] > r["history"][0]["ce_f"] for r in rs]
            flat = [r["history"][-1]["ce_r"] <= r["history"][0]["ce_r"] * 1.1 + 0.05 for r in rs]
            out.append(f"- {LABELS[m]} lr {lr:g}: CE_F rose in {sum(rises)}/{len(rs)} seed(s); "
                       f"CE_R stayed flat or fell (≤ 1.1× start + 0.05) in {sum(flat)}/{len(rs)}.")
        if ("ngdiff_autolr", config.lr) in groups:
            rs = groups[("ngdiff_autolr", config.lr)]
            acc = sum(r["autolr"]["accepted"] for r in rs)
            n = sum(r["autolr"]["probes"] for r in rs)
            end = mean_se([r["autolr"]["final_lr"] for r in rs])[0]
            metrics["ngdiff_autolr_final_lr"] = end
            out.append(f"- NGDiff+AutoLR: {acc}/{n} quadratic fits accepted (Gg > 0 and gHg > 0); "
                       f"lr {config.lr:g} → {end:.2g} after {config.steps} steps.")
        if ("ga", config.lr) in groups:
            ga_mu = mean_se([r["final"]["model_utility"] for r in groups[("ga", config.lr)]])[0]
            out.append(f"- GA: model utility {target_mu:.3f} → {ga_mu:.3f} "
                       f"({'collapsed' if ga_mu < 0.5 * target_mu else 'not collapsed'}, "
                       "threshold half the target's).")
        for m in config.sweep_methods:
            pts = [(lr, mean_se([r["final"]["model_utility"] for r in groups[(m, lr)]])[0])
                   for lr in config.sweep_lrs if (m, lr) in groups]
            if len(pts) > 1:
                mus = [p[1] for p in pts]
                metrics[f"{m}_mu_range_over_lrs"] = max(mus) - min(mus)
                out.append(f"- {LABELS[m]}: model utility across lrs "
                           + ", ".join(f"{lr:g}: {mu:.3f}" for lr, mu in pts)
                           + f" (range {max(mus) - min(mus):.3f}).")
        return out

    def _plot_tradeoff(self, config, groups, bases, ctx) -> str:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.6))
        for which, marker in (("target", "*"), ("retain", "P")):
            mu = mean_se([b[which]["model_utility"] for b in bases])
            # the retain model is the reference: its forget quality is 1 by definition
            fq = [b[which]["log10_forget_quality"] or 0.0 for b in bases]
            f = mean_se(fq)
            ax.errorbar(mu[0], f[0], xerr=mu[1], yerr=f[1], fmt=marker, color="k", ms=12,
                        label=f"{which} model" + (" (reference)" if which == "retain" else ""))
        for (m, lr), rs in sorted(groups.items()):
            n = min(len(r["evals"]) for r in rs)
            if lr == _rep_lr(config, m):  # the path through the evaluations, mean over seeds
                xs = [mean_se([r["evals"][i]["model_utility"] for r in rs])[0] for i in range(n)]
                ys = [mean_se([r["evals"][i]["log10_forget_quality"] for r in rs])[0]
                      for i in range(n)]
                ax.plot(xs, ys, "-", color=COLORS[m], alpha=0.35, lw=1)
            mu = mean_se([r["final"]["model_utility"] for r in rs])
            fq = mean_se([r["final"]["log10_forget_quality"] for r in rs])
            ax.errorbar(mu[0], fq[0], xerr=mu[1], yerr=fq[1], fmt="o", color=COLORS[m],
                        alpha=0.9, label=LABELS[m] if lr == _arm_lrs(config, m)[0] else None)
            if m in config.sweep_methods:
                ax.annotate(f"{lr:g}", (mu[0], fq[0]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel="model utility (↑)", ylabel="log10 forget quality (↑)",
               title="Forget quality vs model utility\n(points: final step, labels: lr; lines: "
                     "path during unlearning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        return ctx.savefig(fig, "fq_vs_mu.png")

    def _plot_trajectories(self, config, groups, ctx) -> str:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for m in config.methods:
            lr = _rep_lr(config, m)
            rs = groups.get((m, lr), [])
            if not rs:
                continue
            n = min(len(r["history"]) for r in rs)
            for ax, key in zip(axes, ("ce_f", "ce_r")):
                ys = torch.tensor([[h[key] for h in r["history"][:n]] for r in rs])
                ax.plot(range(1, n + 1), ys.mean(0).tolist(), color=COLORS[m],
                        label=f"{LABELS[m]} (lr {lr:g})")
        axes[0].set(xlabel="step", ylabel="CE_F (forget batch)", title="Forget loss (↑)")
        axes[1].set(xlabel="step", ylabel="CE_R (retain batch)", title="Retain loss (↓)")
        axes[1].set_yscale("log")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        return ctx.savefig(fig, "ce_trajectories.png")

    def _plot_lr(self, config, groups, ctx) -> str:
        plt = pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for m in config.sweep_methods:
            lrs = [lr for lr in config.sweep_lrs if (m, lr) in groups]
            for ax, key in zip(axes, ("model_utility", "log10_forget_quality")):
                st = [mean_se([r["final"][key] for r in groups[(m, lr)]]) for lr in lrs]
                ax.errorbar(lrs, [s[0] for s in st], yerr=[s[1] for s in st], marker="o",
                            color=COLORS[m], label=LABELS[m], capsize=3)
        axes[0].set(xscale="log", xlabel="lr", ylabel="model utility", title="Utility vs lr")
        axes[1].set(xscale="log", xlabel="lr", ylabel="log10 forget quality",
                    title="Forget quality vs lr")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        return ctx.savefig(fig, "lr_sensitivity.png")
