"""Compute accounting: FLOPs from parameter and token counts, and measured seconds, per stage.

The paper's cost comparison (Figure 1, Figure 3: Math-Shepherd costs about 38.8x the implicit
PRM's data collection and training) counts FLOPs with the usual dense-transformer estimates
(Kaplan et al., 2020), which this module uses for every stage of every job:

* a forward pass costs ``2 * params`` FLOPs per token (one multiply-add per parameter): sampling
  (prompt and generated tokens), reference log-probs, scoring;
* a training step costs ``6 * params`` per token (forward + backward, the backward twice the forward).

``params`` counts every parameter, embeddings included (the tied LM head is a real matmul; for an
8B model the difference is a few percent). Attention's ``L^2`` term is left out, as in the paper:
at these lengths it is small against the weights. The estimates ignore what an engine saves
(vLLM's prefix cache computes a shared prompt once; the count charges it per request), so they
are the compute the algorithm asks for, not what a given engine spent; measured seconds sit next
to them.

Verification runs no model: its FLOPs are 0 and only its seconds and counts are reported.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FORWARD_FLOPS_PER_PARAM_TOKEN = 2.0
TRAIN_FLOPS_PER_PARAM_TOKEN = 6.0

__all__ = ["FORWARD_FLOPS_PER_PARAM_TOKEN", "TRAIN_FLOPS_PER_PARAM_TOKEN", "RolloutTokens", "count_parameters",
           "cpu_seconds", "generation_compute",
           "forward_flops", "measure", "prompt_token_counts", "stage", "total_flops", "train_flops"]


def count_parameters(model_dir: str) -> int:
    """Parameters of a Hugging Face causal LM, counted on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def forward_flops(params: int, tokens: float) -> float:
    """``2 * params * tokens``: one forward pass over ``tokens`` tokens."""
    return FORWARD_FLOPS_PER_PARAM_TOKEN * params * tokens


def train_flops(params: int, tokens: float) -> float:
    """``6 * params * tokens``: forward and backward over ``tokens`` trained tokens."""
    return TRAIN_FLOPS_PER_PARAM_TOKEN * params * tokens


def prompt_token_counts(tokenizer, prompts: list[str]) -> list[int]:
    """Tokens of each prompt as the policy sees it (chat template rendered), counted once per
    distinct prompt."""
    from prm_ray.policy import render_prompt

    cache: dict[str, int] = {}
    for p in set(prompts):
        cache[p] = len(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
    return [cache[p] for p in prompts]


class RolloutTokens:
    """Per-response token counts of a rollout set, for charging each PRM the responses it uses.

    ``prompt`` tokens are the chat-rendered prompt as the policy saw it; ``generated`` tokens are
    ``num_tokens`` (EOS included when produced)."""

    def __init__(self, data: Path, policy: str) -> None:
        from transformers import AutoTokenizer

        from prm_ray.datasets import load_rollouts

        self.table = load_rollouts(data, columns=["instruction_id", "sample_index", "verify_status", "prompt",
                                                  "num_tokens"])
        self.prompt = prompt_token_counts(AutoTokenizer.from_pretrained(policy), self.table.column("prompt").to_pylist())
        self.generated = self.table.column("num_tokens").to_pylist()
        self.keys = list(zip(self.table.column("instruction_id").to_pylist(),
                             self.table.column("sample_index").to_pylist()))
        self.prompt_total = sum(self.prompt)

    def rows_for(self, dataset_cfg) -> list[int]:
        from prm_ray.datasets import selected_rows

        return selected_rows(self.table, dataset_cfg)

    def rows_with_keys(self, keys: set) -> list[int]:
        return [i for i, k in enumerate(self.keys) if k in keys]

    def count(self, rows: list[int]) -> tuple[int, int]:
        return sum(self.prompt[i] for i in rows), sum(self.generated[i] for i in rows)


def generation_compute(data: Path, model: str) -> dict:
    """The compute of sampling a rollout set: ``2 * params * (prompt + generated tokens)``."""
    tokens = RolloutTokens(data, model)
    params = count_parameters(model)
    generated = sum(tokens.generated)
    return {"params": params, "prompt_tokens": tokens.prompt_total, "generated_tokens": generated,
            "flops": forward_flops(params, tokens.prompt_total + generated)}


def stage(flops: float, *, wall_s: float | None = None, cpu_s: float | None = None, **counts) -> dict:
    """One stage's entry in a ``compute`` object: FLOPs, measured seconds (None: not measured,
    e.g. produced by an older run that did not record them) and its token or row counts."""
    return {"flops": float(flops), "wall_s": wall_s, "cpu_s": cpu_s, **counts}


def total_flops(stages: dict[str, dict]) -> float:
    return float(sum(s["flops"] for s in stages.values()))


def cpu_seconds() -> float:
    """The machine's user + nice + system CPU seconds so far (see :func:`measure` for what that covers)."""
    import psutil

    t = psutil.cpu_times()
    # Ray runs its workers niced, and the kernel books niced CPU time as `nice`, not `user`.
    return float(t.user + t.nice + t.system)


@contextmanager
def measure() -> Iterator[dict]:
    """Wall time and CPU-seconds of the enclosed block: ``{"wall_s", "cpu_s"}``, filled on exit.

    CPU-seconds are the whole machine's (user + nice + system over all cores, from ``psutil``), because
    the work runs in Ray workers, not in this process. On a single-node cluster that is the job's
    CPU time plus anything else running on the machine; on a multi-node cluster it counts this
    node only, so it is reported for local runs and should be read as an upper bound.
    """
    out: dict = {}
    t0, c0 = time.time(), cpu_seconds()
    try:
        yield out
    finally:
        out["wall_s"] = time.time() - t0
        out["cpu_s"] = cpu_seconds() - c0
