"""The training objectives, in one registry: name -> loss and how the objective consumes data.

Everything else asks this registry instead of keeping its own list: the example builder (paired
rows or not, step labels or not), the reference pass (which columns get reference log-probs), the
training step (which loss, whether KTO's KL batch is needed), the studies and their report
(implicit or explicit). Adding an objective is one entry here plus its loss in
:mod:`prm_ray.core.losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prm_ray.core.losses import ce_loss, dpo_loss, kto_loss, nca_loss, step_label_loss

__all__ = ["IMPLICIT_OBJECTIVES", "OBJECTIVES", "Objective", "get_objective"]


@dataclass(frozen=True)
class Objective:
    """How one training objective consumes data.

    ``paired``: rows are (chosen = correct, rejected = incorrect) pairs of the same prompt; the
    paper builds every correct x incorrect pair, dropping prompts whose rollouts are all right or
    all wrong. Otherwise rows are unpaired, imbalanced (response, label) rows.
    ``needs_reference_point``: KTO also needs implicit rewards of mismatched prompt/completion pairs each
    step, for its reference point z_ref (:func:`prm_ray.core.losses.kto_reference_point`).
    ``step_labels``: the rollout column of step labels an *explicit* PRM trains on (the
    Math-Shepherd baseline); None for the implicit PRM's outcome-label objectives.
    ``reference_columns``: ``(response column, output column)`` of every response of an example
    whose reference log-prob the implicit reward needs (none for explicit PRMs).
    ``loss``: paired -> ``loss(r_chosen, r_rejected)``; CE -> ``loss(rewards, labels)``; KTO ->
    ``loss(rewards, labels, z_ref)``; step-labelled -> ``loss(step_logits, labels, step_mask)``.
    """

    name: str
    loss: Callable[..., torch.Tensor]
    description: str
    paired: bool = False
    needs_reference_point: bool = False
    step_labels: str | None = None
    reference_columns: tuple[tuple[str, str], ...] = (("response", "ref_logp"),)

    @property
    def explicit(self) -> bool:
        """Trains an explicit PRM (step labels, no reference model) rather than an implicit one."""
        return self.step_labels is not None


_PAIR_REFERENCE = (("chosen", "ref_logp_chosen"), ("rejected", "ref_logp_rejected"))

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("ce", ce_loss, "cross-entropy on outcome labels (eq. 5); unpaired rows"),
    Objective("dpo", dpo_loss, "DPO on correct x incorrect pairs of the same prompt", paired=True,
              reference_columns=_PAIR_REFERENCE),
    Objective("kto", kto_loss, "KTO on unpaired rows, with a batch KL reference point from mismatched pairs",
              needs_reference_point=True, reference_columns=(("response", "ref_logp"), ("kl_response", "ref_logp_kl"))),
    Objective("nca", nca_loss, "pairwise NCA on correct x incorrect pairs of the same prompt", paired=True,
              reference_columns=_PAIR_REFERENCE),
    Objective("math-shepherd-hard", step_label_loss,
              "explicit PRM on Math-Shepherd hard step labels (any completion correct)",
              step_labels="step_labels_hard", reference_columns=()),
    Objective("math-shepherd-soft", step_label_loss,
              "explicit PRM on Math-Shepherd soft step labels (fraction correct)",
              step_labels="step_labels_soft", reference_columns=()),
)}
"""The paper's four objectives (Table 1) and the Math-Shepherd baseline's two, keyed by the name a
training config uses."""

IMPLICIT_OBJECTIVES: tuple[str, ...] = tuple(n for n, o in OBJECTIVES.items() if not o.explicit)


def get_objective(name: str) -> Objective:
    """Look up an objective by name, with an error listing the valid ones."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}") from None
