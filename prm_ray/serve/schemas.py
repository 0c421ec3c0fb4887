"""The service's requests and responses: pydantic models with the config's limits (they are the
OpenAPI schema at /docs), errors that name the field, and the weighted vote of /rerank."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from prm_ray.core.metrics import answer_totals, sigmoid_weights
from prm_ray.core.reward import AGGREGATIONS
from prm_ray.scoring import StepScores
from prm_ray.serve.config import ServeConfig
from prm_ray.tasks import Task, Verdict, VerifyStatus

__all__ = ["InvalidRequest", "as_dict", "field_name", "request_models", "vote_keys", "weighted_vote"]


class InvalidRequest(ValueError):
    """A request field is missing, malformed or too large; ``field`` names it (``responses[3]``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # crosses process boundaries (Serve handles) with both parts intact
        return (InvalidRequest, (self.field, self.message))


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "responses", 3)`` -> ``"responses[3]"``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def request_models(cfg: ServeConfig):
    """Pydantic request/response models with this config's limits (they show up in /docs)."""
    def utf8(value: str) -> str:
        # Lone surrogates come from "\\udXXX" escapes, or from invalid UTF-8 bytes in the body
        # (decoded with surrogateescape so the error can name the field that held them).
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"is not valid UTF-8 text (bad character at position {exc.start})") from None
        return value

    def not_blank(value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value

    def step_text(value: str) -> str:
        if cfg.step_separator in value:
            raise ValueError(f"a step must not contain the step separator {cfg.step_separator!r}")
        return value

    Text = Annotated[str, Field(max_length=cfg.max_chars), AfterValidator(utf8), AfterValidator(not_blank)]
    Step = Annotated[Text, AfterValidator(step_text)]
    Aggregation = Literal[AGGREGATIONS]  # type: ignore[valid-type]
    strict = ConfigDict(extra="forbid", strict=True)

    class ScoreRequest(BaseModel):
        """Score one response: give `response` (split into steps at blank lines) or `steps`."""

        model_config = strict
        prompt: Text
        response: Text | None = None
        steps: Annotated[list[Step], Field(min_length=1, max_length=cfg.max_request_steps)] | None = None
        aggregation: Aggregation = cfg.aggregation
        token_rewards: StrictBool = False

    class RerankRequest(BaseModel):
        """Score N responses to one prompt; pick the best and (optionally) take a weighted vote."""

        model_config = strict
        prompt: Text
        responses: Annotated[list[Text], Field(min_length=1, max_length=cfg.max_responses)]
        aggregation: Aggregation = cfg.aggregation
        weighted_vote: StrictBool = True
        vote_coef: Annotated[float, Field(gt=0, allow_inf_nan=False)] = cfg.vote_coef
        token_rewards: StrictBool = False

    class StepScoresOut(BaseModel):
        steps: list[str]
        step_rewards: list[float]
        q_values: list[float]
        score: float
        aggregation: str
        num_tokens: int
        token_rewards: list[float] | None = None

    class Vote(BaseModel):
        answer: str
        weight: float
        weights: dict[str, float]
        weighted: bool

    class RerankResponse(BaseModel):
        scores: list[float]
        best_index: int
        answers: list[str | None]
        vote: Vote | None
        results: list[StepScoresOut]

    class Health(BaseModel):
        status: str
        model: str
        reference: str | None
        beta: float
        dtype: str

    return ScoreRequest, RerankRequest, StepScoresOut, RerankResponse, Health


def as_dict(s: StepScores, with_tokens: bool) -> dict:
    d = {"steps": s.steps, "step_rewards": s.step_rewards, "q_values": s.q_values, "score": s.score,
         "aggregation": s.aggregation, "num_tokens": s.num_tokens}
    if with_tokens:
        d["token_rewards"] = s.token_rewards
    return d


def vote_keys(answers: Sequence[str | None], task: Task) -> list[str | None]:
    """What each answer votes as: its group among these answers (:meth:`prm_ray.tasks.Task.answer_groups`;
    there is no gold answer here, so none is correct)."""
    verdicts = [Verdict(False, VerifyStatus.OK if a is not None else VerifyStatus.NO_ANSWER, a) for a in answers]
    return task.answer_groups([(verdicts, "")])[0]


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float], coef: float,
                  weighted: bool = True) -> dict | None:
    """The (weighted) majority answer; None when no response has an extractable answer.

    Weights are ``sigmoid(coef * score)`` (:func:`prm_ray.core.metrics.sigmoid_weights`); ties go
    to the answer whose best response scores highest, then to the first seen, so the pick is
    deterministic.
    """
    w = sigmoid_weights(scores, coef).tolist() if weighted else [1.0] * len(scores)
    totals = answer_totals(answers, w)
    if not totals:
        return None
    best: dict[str, float] = {}
    for a, s in zip(answers, scores):
        if a in totals:
            best[a] = max(best.get(a, -math.inf), s)
    top = max(totals.values())
    tied = [a for a, t in totals.items() if math.isclose(t, top, rel_tol=1e-12, abs_tol=1e-15)]
    answer = max(tied, key=lambda a: best[a])  # max keeps the first of equal keys
    return {"answer": answer, "weight": totals[answer], "weights": totals, "weighted": weighted}
