"""Train the embedded default policy from scratch: SFT of a small Llama on arith reference solutions.

The policy is deliberately imperfect: at the rollout temperature it should be right often and wrong
often, with errors that a better model can spot (wrong arithmetic facts in a step), so best-of-N
reranking has room. `evaluate_policy` measures exactly that on held-out (validation) problems.
"""

from __future__ import annotations

import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from prm_ray.artifacts import POLICY_CARD, check_settings, read_json, read_policy_card, write_json
from prm_ray.config import param, save_config, to_dict
from prm_ray.core.metrics import vote
from prm_ray.core.schedule import warmup_cosine
from prm_ray.policy.model import ModelShape, build_char_tokenizer
from prm_ray.resources import cpu_has_native_bf16
from prm_ray.tasks.arith import ArithConfig, ArithTask
from prm_ray.tokens import prompt_ids, render_prompt

__all__ = ["BootstrapConfig", "PolicyEvalConfig", "bootstrap", "calibrate_temperature", "evaluate_policy",
           "sample_responses", "train_policy"]


@dataclass
class PolicyEvalConfig:
    """How the bootstrapped policy is measured (on the validation split, never on test)."""

    split: str = param("validation", "the split it is measured on")
    num_problems: int = param(300, "problems of that split")
    samples: int = param(16, "samples per problem")
    temperature: float | None = param(None, "the rollout temperature, recorded in the policy card; null: "
                                            "calibrate it (the candidate whose pass@1 is closest to target_pass1)")
    target_pass1: float = param(0.5, "the world wants a policy that is often right and often wrong")
    calibration_temperatures: list[float] = param(factory=lambda: [0.8, 1.0, 1.2, 1.4],
                                                  help="candidate temperatures")
    calibration_problems: int = param(100, "problems per candidate")
    top_p: float = param(1.0, "nucleus sampling")
    max_new_tokens: int = param(160, "generated tokens per sample at most")
    batch_size: int = param(256, "sequences per generate call")
    seed: int = param(1234, "sampling seed")


def _shape() -> ModelShape:
    return ModelShape(hidden_size=192, num_layers=3, num_heads=3, intermediate_size=512, max_position_embeddings=256)


@dataclass
class BootstrapConfig:
    """Train the tiny arith policy (SFT from scratch) and measure it."""

    out: str = param("artifacts/policy", "output directory: a Hugging Face model directory and the policy card")
    arith: ArithConfig = param(factory=ArithConfig, help="")
    model: ModelShape = param(factory=_shape, help="")
    train_problems: int = param(100_000, "SFT problems (train split; not capped by arith.num_train)")
    steps: int = param(1500, "optimizer steps")
    batch_size: int = param(64, "sequences per step")
    lr: float = param(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = param(0.1, "the cosine schedule ends at lr x this")
    warmup_frac: float = param(0.05, "share of the steps spent warming up")
    weight_decay: float = param(0.01, "AdamW weight decay on matrices")
    grad_clip: float = param(1.0, "gradient clipping")
    bf16: bool = param(True, "bf16 autocast (the shipped policy's setting; on a CPU without native bf16, e.g. "
                             "AVX2 only, it is emulated and 10-30x slower: pass false there)")
    threads: int = param(2, "torch threads")
    seed: int = param(0, "init, data order and every other seed of the run")
    eval: PolicyEvalConfig = param(factory=PolicyEvalConfig, help="")
    overwrite: bool = param(False, "retrain into an output directory that holds a policy trained with other "
                                   "settings (else refused; the same settings reuse it)")


def _encode_sft(tokenizer, task: ArithTask, n: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt+solution+EOS and the prompt length of each training example."""
    seqs, prompt_lens = [], []
    for inst in task.instructions("train", limit=n):
        p_ids = prompt_ids(tokenizer, inst.prompt)
        resp_ids = tokenizer(inst.meta["solution"], add_special_tokens=False)["input_ids"]
        seqs.append(p_ids + resp_ids + [tokenizer.eos_token_id])
        prompt_lens.append(len(p_ids))
    return seqs, prompt_lens


def _collate(seqs, prompt_lens, idx, pad_id):
    width = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        s = torch.tensor(seqs[i])
        ids[row, : len(s)] = s
        attn[row, : len(s)] = 1
        labels[row, prompt_lens[i] : len(s)] = s[prompt_lens[i] :]  # loss on the response only
    return ids, attn, labels


def train_policy(cfg: BootstrapConfig, progress: bool = True) -> tuple[LlamaForCausalLM, object, dict]:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    torch.set_num_threads(cfg.threads)
    if cfg.bf16 and not cpu_has_native_bf16():
        # Not switched off silently: the precision is part of the recipe (the settings a trained
        # policy is reused by), so the user decides.
        warnings.warn("bootstrap: bf16=true on a CPU without native bf16 (no avx512_bf16/amx_bf16): "
                      "autocast is emulated, measured 11x (1.35M policy) to 30x (3.4M) slower per step "
                      "than fp32; pass --bf16 false to train in fp32", stacklevel=2)
    tokenizer = build_char_tokenizer(cfg.model.max_position_embeddings)
    # The SFT problems come from the train split but are not capped by arith.num_train, which
    # sizes the rollout sets of later stages.
    sft_task = ArithTask(ArithConfig(**{**vars(cfg.arith), "num_train": cfg.train_problems}))
    seqs, prompt_lens = _encode_sft(tokenizer, sft_task, cfg.train_problems)
    model = LlamaForCausalLM(cfg.model.to_config(vocab_size=len(tokenizer)))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    order: list[int] = []
    history = []
    t0 = time.time()
    tokens = 0
    bar = tqdm(range(cfg.steps), desc="SFT policy", disable=not progress, mininterval=2)
    for step in bar:
        # Plain shuffled batches. Length-bucketed batches cut padding (~30% faster steps), but
        # in both bucketed runs we tried (1200 and 2000 steps) the model learned to fetch the
        # k-th operation from the question late (final loss 0.11 and 0.12, pass@1 18% and 14%)
        # against 0.007 and 71% for this recipe at 1500 steps.
        if len(order) < cfg.batch_size:
            fresh = list(range(len(seqs)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        ids, attn, labels = _collate(seqs, prompt_lens, idx, tokenizer.pad_token_id)
        lr = warmup_cosine(step, cfg.steps, max(1, int(cfg.warmup_frac * cfg.steps)), cfg.min_lr_ratio, cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(attn.sum())
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": loss.item(), "lr": lr, "elapsed_s": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
    stats = {
        "train_seconds": time.time() - t0,
        "train_tokens": tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": history[-1]["loss"],
        "history": history,
    }
    model.eval()
    return model, tokenizer, stats


@torch.inference_mode()
def sample_responses(model, tokenizer, prompts: list[str], cfg: PolicyEvalConfig) -> list[list[tuple[str, float]]]:
    """`cfg.samples` sampled responses per prompt with their cumulative log-probs (HF generate)."""
    torch.manual_seed(cfg.seed)
    tokenizer.padding_side = "left"
    out: list[list[tuple[str, float]]] = []
    per_batch = max(1, cfg.batch_size // cfg.samples)
    for start in range(0, len(prompts), per_batch):
        chunk = [render_prompt(tokenizer, p) for p in prompts[start : start + per_batch]]
        enc = tokenizer(chunk, add_special_tokens=False, return_tensors="pt", padding=True)
        gen = model.generate(
            **enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
            max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.samples,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            output_logits=True, return_dict_in_generate=True,
        )
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        # Log-probs under the model's raw distribution (not the tempered one), like vLLM's
        # cumulative_logprob.
        lp = model.compute_transition_scores(gen.sequences, gen.logits, normalize_logits=True)
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            n = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            cum = float(lp[row, :n].sum())
            if row % cfg.samples == 0:
                out.append([])
            out[-1].append((text, cum))
    return out


def calibrate_temperature(model, tokenizer, task: ArithTask, cfg: PolicyEvalConfig) -> tuple[float, list[dict]]:
    """The candidate temperature whose validation pass@1 is closest to `cfg.target_pass1`."""
    table = []
    for t in cfg.calibration_temperatures:
        probe = replace(cfg, temperature=t, num_problems=cfg.calibration_problems)
        m = evaluate_policy(model, tokenizer, task, probe)
        table.append({"temperature": t, "pass@1": m["pass@1"], f"pass@{cfg.samples}": m[f"pass@{cfg.samples}"]})
    best = min(table, key=lambda row: abs(row["pass@1"] - cfg.target_pass1))
    return best["temperature"], table


def evaluate_policy(model, tokenizer, task: ArithTask, cfg: PolicyEvalConfig) -> dict:
    """pass@1, pass@k, majority@k and own-likelihood best-of-k on held-out problems."""
    if cfg.temperature is None:
        raise ValueError("evaluate_policy needs a temperature (calibrate it first)")
    insts = list(task.instructions(cfg.split, limit=cfg.num_problems))
    t0 = time.time()
    samples = sample_responses(model, tokenizer, [i.prompt for i in insts], cfg)
    k = cfg.samples
    per_problem = []
    statuses: Counter = Counter()
    gen_tokens = 0
    for inst, resp in zip(insts, samples):
        verdicts = [task.verify(text, inst.answer) for text, _ in resp]
        statuses.update(v.status.value for v in verdicts)
        gen_tokens += sum(len(text) + 1 for text, _ in resp)
        correct = [v.correct for v in verdicts]
        # Ties in the vote count as a fractional win, so the estimate is not order-dependent.
        maj = vote(task.answer_groups([(verdicts, inst.answer)])[0], correct)
        best = max(range(k), key=lambda j: resp[j][1])
        per_problem.append({
            "pass1": sum(correct) / k, "passk": float(any(correct)), "majority": maj,
            "likelihood_bon": float(correct[best]), "num_steps": inst.meta["num_steps"],
        })
    n = len(per_problem)
    metrics = {
        "split": cfg.split, "problems": n, "samples": k, "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "pass@1": sum(p["pass1"] for p in per_problem) / n,
        f"pass@{k}": sum(p["passk"] for p in per_problem) / n,
        f"majority@{k}": sum(p["majority"] for p in per_problem) / n,
        f"likelihood_bon@{k}": sum(p["likelihood_bon"] for p in per_problem) / n,
        "verify_status": dict(statuses),
        "sample_seconds": time.time() - t0,
        "generated_tokens": gen_tokens,
    }
    by_steps: dict[int, list[float]] = {}
    for p in per_problem:
        by_steps.setdefault(p["num_steps"], []).append(p["pass1"])
    metrics["pass@1_by_num_steps"] = {str(s): sum(v) / len(v) for s, v in sorted(by_steps.items())}
    return metrics


SETTINGS_IGNORED = ("out", "overwrite")


def bootstrap(cfg: BootstrapConfig, progress: bool = True) -> dict:
    """Train, save (HF format) and evaluate the policy.

    A finished policy trained with the same settings is reused; one trained with other settings is
    refused unless ``cfg.overwrite``.
    """
    out = Path(cfg.out)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in SETTINGS_IGNORED}
    recorded = read_json(out / "bootstrap_settings.json")
    if (out / POLICY_CARD).exists() and check_settings(out, recorded, settings, what="a policy",
                                                        overwrite=cfg.overwrite):
        card = read_policy_card(out)
        card["reused"] = True
        return card
    model, tokenizer, stats = train_policy(cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    task = ArithTask(cfg.arith)
    calibration: list[dict] = []
    eval_cfg = cfg.eval
    if eval_cfg.temperature is None:
        temperature, calibration = calibrate_temperature(model, tokenizer, task, eval_cfg)
        eval_cfg = replace(eval_cfg, temperature=temperature)
    metrics = evaluate_policy(model, tokenizer, task, eval_cfg)
    save_config(cfg, out / "bootstrap_config.yaml")
    write_json(out / "bootstrap_settings.json", settings)
    card = {
        "task": "arith",
        "arith": vars(cfg.arith),
        "rollout_temperature": eval_cfg.temperature,
        "temperature_calibration": calibration,
        "rollout_top_p": cfg.eval.top_p,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "train": {k: v for k, v in stats.items() if k != "history"},
        "metrics": metrics,
        "seed": cfg.seed,
    }
    write_json(out / "train_history.json", stats["history"])
    write_json(out / POLICY_CARD, card)
    card["reused"] = False
    return card
