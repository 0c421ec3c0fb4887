"""Batched scoring for the service, pure PyTorch: many requests, one PRM forward and one reference
forward; a prompt shared by several responses runs once, its KV cache fanned out to each."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prm_ray.core.reward import (
    forward_parameters,
    gather_logprobs,
    head_and_trunk,
    masked_head_logprobs,
    token_rewards,
)
from prm_ray.scoring import ImplicitPRM, StepScores, assemble
from prm_ray.tokens import TokenizedItem

__all__ = ["BatchScorer", "ScoreJob", "job_size", "padded_tokens", "split_jobs"]


@dataclass
class ScoreJob:
    """One request's worth of work: its tokenized responses and how to aggregate them.
    ``by_tokens``: the batch it joins is measured in padded tokens, not responses."""

    items: list[TokenizedItem]
    aggregation: str = "min"
    by_tokens: bool = False


def padded_tokens(items: Sequence[TokenizedItem]) -> int:
    """What a full-plan forward of ``items`` costs: responses x the longest sequence."""
    return len(items) * max((len(it.input_ids) for it in items), default=0)


def job_size(jobs: Sequence[ScoreJob]) -> int:
    """Batch size for Serve's ``max_batch_size``: responses (a /rerank of N fills N slots), or with
    a token budget the batch's padded tokens."""
    if jobs and jobs[0].by_tokens:
        return padded_tokens([it for j in jobs for it in j.items])
    return sum(len(j.items) for j in jobs)


def split_jobs(items: Sequence[TokenizedItem], max_responses: int, max_tokens: int | None) -> list[list[TokenizedItem]]:
    """A request's responses in parts that each fit a batch alone (Serve refuses an entry larger
    than ``max_batch_size``): ``max_responses`` each, or, with ``max_tokens``, parts whose padded
    tokens stay within it (each item fits alone: the budget is at least the model's context)."""
    if max_tokens is None:
        return [list(items[i : i + max_responses]) for i in range(0, len(items), max_responses)]
    parts: list[list[TokenizedItem]] = [[]]
    for it in items:
        if parts[-1] and padded_tokens(parts[-1] + [it]) > max_tokens:
            parts.append([])
        parts[-1].append(it)
    return parts


def _prompt_groups(items: Sequence[TokenizedItem]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[tuple(it.input_ids[: it.prompt_len])].append(i)
    return groups


class BatchScorer:
    """Score many requests as one batch: one PRM forward and one reference forward.

    Two ways to run a batch, chosen per batch by its padded token count (a fair proxy for CPU
    and GPU time of a small batch):

    * full: every row is prompt + response, right-padded (what :meth:`ImplicitPRM.score` does);
    * shared prompt: each distinct prompt (minus its last token) runs once with ``use_cache``,
      its KV cache is gathered to one row per response, and the responses run on top of it,
      each led by its prompt's last token (whose logits predict the first response token).

    Both give the same numbers up to float rounding (tested against ``ImplicitPRM.score``).
    """

    def __init__(self, prm: ImplicitPRM, *, share_prompt: bool = True, min_saving: float = 0.25) -> None:
        self.prm = prm
        self.share_prompt = share_prompt
        self.min_saving = min_saving

    # -- planning ------------------------------------------------------------------------------

    def plan(self, items: Sequence[TokenizedItem]) -> str:
        """``"shared"`` when running prompts once saves ``min_saving`` of the padded tokens, else ``"full"``."""
        if not self.share_prompt or len(items) < 2:
            return "full"
        groups = _prompt_groups(items)
        if len(groups) == len(items) or min(len(p) for p in groups) < 2:
            return "full"  # nothing shared, or a one-token prompt leaves no cache to share
        full = len(items) * max(len(it.input_ids) for it in items)
        shared = (len(groups) * (max(len(p) for p in groups) - 1)
                  + len(items) * (1 + max(it.num_response_tokens for it in items)))
        return "shared" if shared <= (1 - self.min_saving) * full else "full"

    # -- forward passes ------------------------------------------------------------------------

    @torch.inference_mode()
    def _full(self, items: Sequence[TokenizedItem]):
        batch = self.prm.collate(items)
        tok_r = self.prm.token_rewards(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        starts = [it.prompt_len for it in items]
        return tok_r, batch["step_ids"], starts

    @torch.inference_mode()
    def _shared(self, items: Sequence[TokenizedItem]):
        prm = self.prm
        dev = prm.device
        groups = list(_prompt_groups(items).items())
        group_of = [0] * len(items)
        for g, (_, rows) in enumerate(groups):
            for i in rows:
                group_of[i] = g
        prompts = [list(p) for p, _ in groups]
        ctx_len = [len(p) - 1 for p in prompts]  # cached part: the prompt minus its last token
        C = max(ctx_len)
        ctx_ids = torch.full((len(groups), C), prm.pad_id, dtype=torch.long)
        ctx_mask = torch.zeros(len(groups), C, dtype=torch.long)
        for g, p in enumerate(prompts):
            ctx_ids[g, : ctx_len[g]] = torch.tensor(p[:-1])
            ctx_mask[g, : ctx_len[g]] = 1
        M = len(items)
        R = 1 + max(it.num_response_tokens for it in items)  # the prompt's last token + response
        ids = torch.full((M, R), prm.pad_id, dtype=torch.long)
        attn = torch.zeros(M, C + R, dtype=torch.long)
        pos = torch.zeros(M, R, dtype=torch.long)
        step_ids = torch.full((M, R - 1), -1, dtype=torch.long)
        target_mask = torch.zeros(M, R - 1, dtype=torch.bool)
        for m, it in enumerate(items):
            g, n = group_of[m], it.num_response_tokens
            ids[m, 0] = prompts[g][-1]
            ids[m, 1 : 1 + n] = torch.tensor(it.input_ids[it.prompt_len :])
            attn[m, : ctx_len[g]] = 1
            attn[m, C : C + 1 + n] = 1
            pos[m] = torch.arange(ctx_len[g], ctx_len[g] + R)
            step_ids[m, :n] = torch.tensor(it.step_ids)
            target_mask[m, :n] = True
        index = torch.tensor(group_of, device=dev)
        ctx_ids, ctx_mask, ids, attn, pos = (t.to(dev) for t in (ctx_ids, ctx_mask, ids, attn, pos))

        def logprobs(model) -> torch.Tensor:
            # Only the cache is needed from the prompt pass: the trunk alone where the head is plain
            # (then the response pass goes through the chunked head too), else skip what the LM head allows.
            parts = head_and_trunk(model)
            if parts is not None:
                head, trunk = parts
                cache = trunk(input_ids=ctx_ids, attention_mask=ctx_mask, use_cache=True).past_key_values
            else:
                keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
                cache = model(input_ids=ctx_ids, attention_mask=ctx_mask, use_cache=True, **keep).past_key_values
            cache.reorder_cache(index)  # one cache row per response (a gather, like beam search)
            run = trunk if parts is not None else model
            out = run(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
            if parts is not None:  # column j predicts response token j
                return masked_head_logprobs(out.last_hidden_state[:, :-1], head, ids[:, 1:], target_mask.to(dev))
            return gather_logprobs(out.logits[:, :-1], ids[:, 1:], target_mask.to(dev))

        logp = logprobs(prm.model)
        ref_logp = logprobs(prm.ref_model) if prm.ref_model is not None else None
        tok_r = token_rewards(logp, ref_logp, target_mask.to(dev), prm.beta).cpu()
        return tok_r, step_ids, [0] * M

    # -- public --------------------------------------------------------------------------------

    def score_items(self, items: Sequence[TokenizedItem], aggregations: Sequence[str],
                    plan: str | None = None) -> list[StepScores]:
        """Score items as one batch; ``aggregations[i]`` aggregates item i."""
        if not items:
            return []
        plan = plan or self.plan(items)
        tok_r, step_ids, starts = self._shared(items) if plan == "shared" else self._full(items)
        return assemble(tok_r, step_ids, items, aggregations, starts)

    def score_jobs(self, jobs: Sequence[ScoreJob], plan: str | None = None) -> list[list[StepScores]]:
        """Score every job's items in one batch; results come back per job, in order."""
        items = [it for j in jobs for it in j.items]
        methods = [j.aggregation for j in jobs for _ in j.items]
        flat = self.score_items(items, methods, plan=plan)
        out, k = [], 0
        for j in jobs:
            out.append(flat[k : k + len(j.items)])
            k += len(j.items)
        return out

