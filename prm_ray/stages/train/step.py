"""One micro-batch of training, for any objective: token columns -> implicit rewards (or step logits) -> loss.

The rows arrive tokenized (Arrow list columns, computed once per dataset), so a step does no
per-row Python: padding is array operations over the Arrow buffers (:func:`prm_ray.tokens.collate_tokens`).

Pure PyTorch (``torch.distributed`` only for KTO's global reference point): the Ray Train worker
loop (:mod:`prm_ray.stages.train.worker`) and the throughput benchmark call :func:`micro_batch_loss`.
The objective comes from :mod:`prm_ray.core.objectives`; the reward is
:func:`prm_ray.core.reward.sequence_reward` of the trained model's sequence log-probs and the
reference's (precomputed once, before training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from prm_ray.core.losses import kto_reference_point
from prm_ray.core.objectives import get_objective
from prm_ray.core.reward import ResponseLogprobs, sequence_reward, step_label_logits
from prm_ray.stages.train.config import TrainConfig
from prm_ray.stages.train.examples import RESPONSE_KEYS
from prm_ray.tokens import TOKEN_NAMES, collate_tokens, list_values

__all__ = ["StepContext", "micro_batch_loss", "micro_batches", "reduce_stats", "sequence_logprobs"]

STAT_KEYS = ("loss", "acc", "reward_correct", "reward_incorrect", "n_correct", "n_incorrect", "tokens", "padded")


@dataclass
class StepContext:
    """What a micro-batch needs besides its rows: the model and how to run it.

    ``model`` is a :class:`prm_ray.core.reward.ResponseLogprobs` (as DDP or FSDP wrap it in a
    worker); a bare causal LM is wrapped in one with ``cfg.logprob_chunk``.
    """

    model: torch.nn.Module
    cfg: TrainConfig
    pad_id: int
    device: torch.device
    autocast: bool
    label_token_ids: tuple[int, int] | None = None  # explicit PRMs: the "+" / "-" token ids

    def __post_init__(self) -> None:
        inner = getattr(self.model, "module", self.model)  # under DDP
        if not isinstance(inner, ResponseLogprobs):
            self.model = ResponseLogprobs(self.model, self.cfg.logprob_chunk)


def _floats(batch: pa.Table, col: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(batch.column(col).to_numpy().astype(np.float32)).to(device)


def _tokens(batch: pa.Table, columns: tuple[str, ...], pad_id: int) -> dict[str, torch.Tensor]:
    """The padded tensors of the token columns of ``columns`` (text columns, e.g. chosen and
    rejected), stacked in that order into one batch: one forward pass for all of them."""
    parts = [batch.select([f"{c}_{n}" for n in TOKEN_NAMES]).rename_columns(list(TOKEN_NAMES)) for c in columns]
    return collate_tokens(pa.concat_tables(parts) if len(parts) > 1 else parts[0], pad_id)


def micro_batches(rows: pa.Table, size: int, group_by_length: bool) -> list[pa.Table]:
    """One optimizer step's rows in micro-batches of ``size``. ``group_by_length``: rows of similar
    length together (sorted by their longest sequence, longest first), so less of each forward is
    padding; the step still trains on the same rows, so its gradient is the same sum."""
    if group_by_length:
        cols = [f"{c}_input_ids" for c in RESPONSE_KEYS if f"{c}_input_ids" in rows.column_names]
        longest = np.max([list_values(rows.column(c))[1] for c in cols], axis=0)
        rows = rows.take(np.argsort(-longest, kind="stable"))
    return [rows.slice(i, size) for i in range(0, rows.num_rows, size)]


def sequence_logprobs(ctx: StepContext, batch: pa.Table, *columns: str) -> tuple[torch.Tensor, int, int]:
    """``log pi_phi(response | prompt)`` per row of each text column (response tokens, EOS
    included), stacked; the tokens run and the padded tokens of the forward."""
    t = _tokens(batch, columns, ctx.pad_id)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
        lp = ctx.model(t["input_ids"].to(ctx.device), t["attention_mask"].to(ctx.device),
                       t["response_mask"].to(ctx.device))
    return lp.sum(-1).float(), int(t["attention_mask"].sum()), t["input_ids"].numel()


def _step_label_loss(ctx: StepContext, batch: pa.Table) -> tuple[torch.Tensor, dict]:
    """An explicit PRM's micro-batch: step logits at each step's last token against step labels
    (their count per row was checked against the tokenizer's steps when the tokens were attached)."""
    t = _tokens(batch, ("response",), ctx.pad_id)
    values, lengths = list_values(batch.column("step_labels"))
    num_steps = int(lengths.max())
    labels = np.zeros((len(lengths), num_steps), dtype=np.float32)
    labels[np.arange(num_steps)[None, :] < lengths[:, None]] = values
    labels = torch.from_numpy(labels).to(ctx.device)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
        logits = ctx.model(t["input_ids"].to(ctx.device), t["attention_mask"].to(ctx.device))
    z, mask = step_label_logits(logits.float(), t["step_ids"].to(ctx.device), *ctx.label_token_ids, num_steps)
    loss = get_objective(ctx.cfg.dataset.objective).loss(z, labels, mask)
    pos, neg = mask & (labels > 0.5), mask & (labels <= 0.5)
    stats = {"acc": ((z > 0) == (labels > 0.5))[mask].float().mean().item(),
             "reward_correct": z[pos].sum().item(), "reward_incorrect": z[neg].sum().item(),
             "n_correct": int(pos.sum()), "n_incorrect": int(neg.sum()), "sums": True,
             "tokens": int(t["attention_mask"].sum()), "padded": t["input_ids"].numel()}
    return loss, stats


def micro_batch_loss(ctx: StepContext, batch: pa.Table) -> tuple[torch.Tensor, dict]:
    """Loss and statistics of one micro-batch of training examples with their token columns
    (:func:`prm_ray.stages.train.examples.attach_tokens`), for any objective."""
    cfg = ctx.cfg
    objective = get_objective(cfg.dataset.objective)
    if objective.explicit:
        return _step_label_loss(ctx, batch)

    stats: dict[str, Any] = {}
    if objective.paired:
        n = batch.num_rows
        logp, ntok, padded = sequence_logprobs(ctx, batch, "chosen", "rejected")
        r_c = sequence_reward(logp[:n], _floats(batch, "ref_logp_chosen", ctx.device), cfg.beta)
        r_r = sequence_reward(logp[n:], _floats(batch, "ref_logp_rejected", ctx.device), cfg.beta)
        loss = objective.loss(r_c, r_r)
        stats.update(acc=(r_c > r_r).float().mean().item(), reward_correct=r_c.mean().item(),
                     reward_incorrect=r_r.mean().item(), n_correct=n, n_incorrect=n)
    else:
        logp, ntok, padded = sequence_logprobs(ctx, batch, "response")
        r = sequence_reward(logp, _floats(batch, "ref_logp", ctx.device), cfg.beta)
        labels = _floats(batch, "label", ctx.device)
        if objective.needs_reference_point:
            with torch.no_grad():
                kl_logp, kl_tok, kl_padded = sequence_logprobs(ctx, batch, "kl_response")
                ntok, padded = ntok + kl_tok, padded + kl_padded
                kl_r = sequence_reward(kl_logp, _floats(batch, "ref_logp_kl", ctx.device), cfg.beta)
                # Mean over the GLOBAL batch before the clamp, as KTO defines it.
                total = torch.stack([kl_r.sum(), torch.tensor(float(kl_r.numel()), device=ctx.device)])
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(total)
                z_ref = kto_reference_point(torch.full((1,), float(total[0] / total[1]), device=ctx.device))
            loss = objective.loss(r, labels, z_ref, desirable_weight=cfg.kto_desirable_weight,
                                  undesirable_weight=cfg.kto_undesirable_weight)
        else:
            loss = objective.loss(r, labels)
        pos, neg = labels > 0.5, labels <= 0.5
        stats.update(acc=((r > 0) == pos).float().mean().item(),
                     reward_correct=r[pos].sum().item(), reward_incorrect=r[neg].sum().item(),
                     n_correct=int(pos.sum()), n_incorrect=int(neg.sum()))
        # Means are formed after summing over micro-batches (classes vary in size).
        stats["sums"] = True
    stats["tokens"], stats["padded"] = ntok, padded
    return loss, stats


def reduce_stats(stats: list[dict], world: int) -> dict:
    """Average a step's micro-batch statistics over micro-batches and workers."""
    vec = torch.tensor([[s[k] for k in STAT_KEYS] for s in stats], dtype=torch.float64).sum(0)
    vec = torch.cat([vec, torch.tensor([len(stats)], dtype=torch.float64)])
    if world > 1 and dist.is_initialized():
        dist.all_reduce(vec)
    d = dict(zip(STAT_KEYS + ("micro",), vec.tolist()))
    out = {"loss": d["loss"] / d["micro"], "acc": d["acc"] / d["micro"], "tokens": d["tokens"],
           "padding_fraction": 1 - d["tokens"] / d["padded"] if d["padded"] else 0.0}
    if stats[0].get("sums"):
        out["reward_correct"] = d["reward_correct"] / d["n_correct"] if d["n_correct"] else None
        out["reward_incorrect"] = d["reward_incorrect"] / d["n_incorrect"] if d["n_incorrect"] else None
    else:
        out["reward_correct"] = d["reward_correct"] / d["micro"]
        out["reward_incorrect"] = d["reward_incorrect"] / d["micro"]
    return out
