"""What each PRM of a study cost, stage by stage: FLOPs (:mod:`prm_ray.core.flops`) from the token
counts of exactly the data it used, next to the measured wall and CPU seconds of those stages.

A PRM is charged for the rollout rows its training data is built from (its k responses of its
instructions, or, for Math-Shepherd, the responses it labelled), for step-label completions,
for the reference pass (when trained with the reference), for training, and for scoring the
held-out responses. A stage shared by several PRMs (one rollout set) is charged to each in
proportion to the tokens it uses of it.
"""

from __future__ import annotations

from pathlib import Path

from prm_ray.artifacts import load_rollouts, read_timing
from prm_ray.core.flops import forward_flops, stage, total_flops, train_flops
from prm_ray.models import load_tokenizer
from prm_ray.stages.train.examples import DatasetConfig, selected_rows
from prm_ray.tokens import prompt_token_counts

__all__ = ["RolloutTokens", "prm_compute"]


class RolloutTokens:
    """Per-response token counts of a rollout set, for charging each PRM the responses it uses.

    ``prompt`` tokens are the chat-rendered prompt as the policy saw it; ``generated`` tokens are
    ``num_tokens`` (EOS included when produced)."""

    def __init__(self, data: Path, policy: str) -> None:
        self.table = load_rollouts(data, columns=["instruction_id", "sample_index", "verify_status", "prompt",
                                                  "num_tokens"])
        self.prompt = prompt_token_counts(load_tokenizer(policy), self.table.column("prompt").to_pylist())
        self.generated = self.table.column("num_tokens").to_pylist()
        self.keys = list(zip(self.table.column("instruction_id").to_pylist(),
                             self.table.column("sample_index").to_pylist()))
        self.prompt_total = sum(self.prompt)
        self.generated_total = sum(self.generated)

    def rows_for(self, dataset_cfg: DatasetConfig) -> list[int]:
        return selected_rows(self.table, dataset_cfg)

    def rows_with_keys(self, keys: set) -> list[int]:
        return [i for i, k in enumerate(self.keys) if k in keys]

    def count(self, rows: list[int]) -> tuple[int, int]:
        return sum(self.prompt[i] for i in rows), sum(self.generated[i] for i in rows)


def _scaled(value: float | None, share: float) -> float | None:
    return None if value is None else value * share


def prm_compute(*, params: int, prm_params: int | None = None, dataset: DatasetConfig, epochs: int, train_tokens: float, rollouts: RolloutTokens,
                rollout_runs: dict | None, labels_dir: Path | None, labels_timing: dict | None, reference_train: bool,
                test_tokens: RolloutTokens, reference_infer: bool, train_dir: Path, eval_dir: Path) -> dict:
    """What one PRM cost, stage by stage.

    * generation: the training responses its data is built from (its k responses of its
      instructions; for Math-Shepherd, the labelled responses), prompt and generated tokens;
    * verification: the same responses (no FLOPs; verifier busy seconds, which overlap generation);
    * step-label completions / verification (Math-Shepherd only): K completions per step boundary;
    * reference log-probs (trained with the reference only): one forward over those sequences;
    * training: 6 x params x trained tokens; scoring: the held-out responses, once per model.

    ``params``: the policy's (sampling); ``prm_params``: the PRM's and its reference's (reference
    pass, training, scoring; None: ``params``).
    ``rollout_runs``: the rollout set's totals over every run that made it (``summary["all_runs"]``);
    ``labels_timing``: the step labels' timing totals. ``build_flops`` leaves out scoring (the
    paper's cost of a PRM: data collection and training).
    """
    if labels_dir is not None:
        lab = load_rollouts(labels_dir, columns=["instruction_id", "sample_index", "completion_prompt_tokens",
                                                 "completion_generated_tokens", "step_completions"])
        rows = rollouts.rows_with_keys(set(zip(lab.column("instruction_id").to_pylist(),
                                               lab.column("sample_index").to_pylist())))
    else:
        rows = rollouts.rows_for(dataset)
    p_tok, g_tok = rollouts.count(rows)
    runs = rollout_runs or {}
    share = (p_tok + g_tok) / max(1, rollouts.prompt_total + rollouts.generated_total)
    stages = {
        "generation": stage(forward_flops(params, p_tok + g_tok), wall_s=_scaled(runs.get("wall_seconds"), share),
                            cpu_s=_scaled(runs.get("cpu_seconds"), share), prompt_tokens=p_tok,
                            generated_tokens=g_tok, responses=len(rows)),
        "verification": stage(0.0, wall_s=_scaled(runs.get("verify_seconds"), share), responses=len(rows)),
    }
    if labels_dir is not None:
        cp = sum(lab.column("completion_prompt_tokens").to_pylist())
        cg = sum(lab.column("completion_generated_tokens").to_pylist())
        per_step = lab.column("step_completions").to_pylist()
        completions = sum(sum(c[:-1]) for c in per_step)  # the last step samples none
        totals = labels_timing or {}
        stages["step-label completions"] = stage(
            forward_flops(params, cp + cg), wall_s=totals.get("wall_seconds"), cpu_s=totals.get("cpu_seconds"),
            prompt_tokens=cp, generated_tokens=cg, completions=completions,
            steps=sum(len(c) for c in per_step), boundaries=sum(1 for c in per_step for x in c[:-1] if x > 0))
        stages["step-label verification"] = stage(0.0, wall_s=totals.get("verify_seconds"), completions=completions)
    prm_params = params if prm_params is None else prm_params
    if reference_train:
        stages["reference log-probs"] = stage(forward_flops(prm_params, p_tok + g_tok), tokens=p_tok + g_tok)
    stages["training"] = stage(train_flops(prm_params, train_tokens), **(read_timing(train_dir, "train") or {}),
                               tokens=train_tokens, epochs=epochs)
    t_tok = test_tokens.prompt_total + test_tokens.generated_total
    forwards = 2 if reference_infer else 1
    stages["scoring"] = stage(forwards * forward_flops(prm_params, t_tok), **(read_timing(eval_dir, "eval") or {}),
                              tokens=t_tok, responses=len(test_tokens.generated), forwards_per_token=forwards)
    total = total_flops(stages)
    return {"params": params, "stages": stages, "total_flops": total,
            "build_flops": total - stages["scoring"]["flops"]}
