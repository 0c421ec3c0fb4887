"""FLOPs from parameter and token counts: the estimates behind the paper's cost comparison.

Figure 1 and Figure 3 (Math-Shepherd costs about 38.8x the implicit PRM's data collection and
training) count FLOPs with the usual dense-transformer estimates (Kaplan et al., 2020), which
every stage of every job uses:

* a forward pass costs ``2 * params`` FLOPs per token (one multiply-add per parameter): sampling
  (prompt and generated tokens), reference log-probs, scoring;
* a training step costs ``6 * params`` per token (forward + backward, the backward twice the forward).

``params`` counts every parameter, embeddings included (the tied LM head is a real matmul; for an
8B model the difference is a few percent). Attention's ``L^2`` term is left out, as in the paper:
at these lengths it is small against the weights. The estimates ignore what an engine saves
(vLLM's prefix cache computes a shared prompt once; the count charges it per request), so they
are the compute the algorithm asks for, not what a given engine spent; measured seconds sit next
to them. Verification runs no model: its FLOPs are 0.
"""

from __future__ import annotations

FORWARD_FLOPS_PER_PARAM_TOKEN = 2.0
TRAIN_FLOPS_PER_PARAM_TOKEN = 6.0

__all__ = ["FORWARD_FLOPS_PER_PARAM_TOKEN", "TRAIN_FLOPS_PER_PARAM_TOKEN", "forward_flops", "stage", "total_flops",
           "train_flops"]


def forward_flops(params: int, tokens: float) -> float:
    """``2 * params * tokens``: one forward pass over ``tokens`` tokens."""
    return FORWARD_FLOPS_PER_PARAM_TOKEN * params * tokens


def train_flops(params: int, tokens: float) -> float:
    """``6 * params * tokens``: forward and backward over ``tokens`` trained tokens."""
    return TRAIN_FLOPS_PER_PARAM_TOKEN * params * tokens


def stage(flops: float, *, wall_s: float | None = None, cpu_s: float | None = None, **counts) -> dict:
    """One stage's entry in a ``compute`` object: FLOPs, measured seconds (None: not measured,
    e.g. produced by a run that did not record them) and its token or row counts."""
    return {"flops": float(flops), "wall_s": wall_s, "cpu_s": cpu_s, **counts}


def total_flops(stages: dict[str, dict]) -> float:
    return float(sum(s["flops"] for s in stages.values()))
