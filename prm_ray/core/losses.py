"""Response-level objectives that train an implicit PRM (paper section 3 and 4.1).

Every loss takes *implicit rewards* ``r = beta * log pi_phi(y) / pi_ref(y)``, the per-token
log-ratio summed over the response tokens and already multiplied by beta (see
:func:`prm_ray.core.reward.implicit_reward`). Training any of them makes the per-token log-ratio a
process reward for free (Prop. 3.1): the objective only decides *how* outcome labels shape r.

Each loss returns the mean over rows by default; ``reduction="none"`` gives per-row values
(``"sum"`` is also accepted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ce_loss",
    "dpo_loss",
    "kto_loss",
    "kto_reference_point",
    "nca_loss",
    "step_label_loss",
]

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(_REDUCTIONS)}")


def ce_loss(rewards: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on outcome labels, eq. 5: ``BCE(sigmoid(r), l)``.

    ``-l * log sigmoid(r) - (1 - l) * log(1 - sigmoid(r))``, computed from the logit r with
    ``binary_cross_entropy_with_logits`` (stable for large |r|). Unpaired rows; labels in {0, 1}
    (soft labels in [0, 1] also work).
    """
    losses = F.binary_cross_entropy_with_logits(rewards, labels.to(rewards.dtype), reduction="none")
    return _reduce(losses, reduction)


def dpo_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """DPO (Rafailov et al., 2023) on correct/incorrect pairs: ``-log sigmoid(r_c - r_r)``."""
    return _reduce(-F.logsigmoid(r_chosen - r_rejected), reduction)


def nca_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Pairwise NCA (Chen et al., 2024), as in TRL's ``loss_type="nca_pair"``.

    ``-log sigmoid(r_c) - 0.5 * log sigmoid(-r_c) - 0.5 * log sigmoid(-r_r)``: unlike DPO it
    pushes the chosen reward up in absolute terms, not only relative to the rejected one.
    """
    losses = -F.logsigmoid(r_chosen) - 0.5 * F.logsigmoid(-r_chosen) - 0.5 * F.logsigmoid(-r_rejected)
    return _reduce(losses, reduction)


def kto_reference_point(mismatched_rewards: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z_ref``: a batch estimate of ``beta * KL(pi_phi || pi_ref)``.

    ``mismatched_rewards`` are implicit rewards ``beta * log pi_phi(y'|x) / pi_ref(y'|x)`` of
    mismatched prompt/completion pairs (each prompt with another instruction's completion, built
    with the training examples: ``prm_ray.stages.train.examples``). Returns
    ``clamp(mean, min=0)``, detached: KTO treats z_ref as a constant (no gradient flows into it).
    In a data-parallel run, average the mean across workers before clamping, as TRL does.
    """
    return mismatched_rewards.detach().mean().clamp(min=0)


def kto_loss(
    rewards: torch.Tensor,
    labels: torch.Tensor,
    z_ref: torch.Tensor | float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """KTO (Ethayarajh et al., 2024) on unpaired rows, TRL's formulation.

    Desirable rows (label 1): ``lambda_D * (1 - sigmoid(r - z_ref))``;
    undesirable rows (label 0): ``lambda_U * (1 - sigmoid(z_ref - r))``.
    ``z_ref`` comes from :func:`kto_reference_point` and is detached here as well. The mean is
    over all rows (TRL concatenates the weighted desirable and undesirable losses and averages).
    """
    z = torch.as_tensor(z_ref, dtype=rewards.dtype, device=rewards.device).detach()
    desirable = labels.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(rewards - z)),
        undesirable_weight * (1 - torch.sigmoid(z - rewards)),
    )
    return _reduce(losses, reduction)


def step_label_loss(step_logits: torch.Tensor, step_labels: torch.Tensor, step_mask: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """The explicit PRM's objective (Math-Shepherd): BCE of every labelled step.

    ``step_logits`` ``[B, S]`` are ``logit(+) - logit(-)`` at each step's last token
    (:func:`prm_ray.core.reward.step_label_logits`); ``step_labels`` are hard (0/1, "any completion
    reached the answer") or soft (the fraction that did) estimates. Binary cross-entropy on the
    logit difference is the two-way softmax cross-entropy over the "+"/"-" tokens that
    Math-Shepherd and OpenRLHF's PRM trainer use. ``"mean"`` averages over labelled steps of the
    batch (not over responses), as OpenRLHF averages over its step-tag tokens; ``"none"`` gives
    ``[B, S]`` with 0 on padded slots.
    """
    mask = step_mask.bool()
    losses = F.binary_cross_entropy_with_logits(step_logits, step_labels.to(step_logits.dtype), reduction="none")
    losses = torch.where(mask, losses, torch.zeros((), dtype=losses.dtype, device=losses.device))
    if reduction == "mean":
        return losses.sum() / mask.sum().clamp(min=1)
    return _reduce(losses, reduction)
