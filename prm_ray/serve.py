"""A Ray Serve endpoint that scores responses step by step with an implicit PRM.

    serve run cluster/serve_scorer.yaml
    python jobs/serve_scorer.py --prm runs/prm-ce --ref artifacts/policy
    curl -s localhost:8000/score -H 'content-type: application/json' \\
        -d '{"prompt": "7+5*3", "response": "Step 1: 7+5 = 2\\n\\nStep 2: 2*3 = 6\\n\\nThe answer is \\\\boxed{6}"}'

Three layers, each usable on its own:

* :class:`BatchScorer`: pure PyTorch. Scores a batch of requests with one PRM forward and one
  reference forward over the same padded tensors; when several responses share a prompt and the
  saving is worth it, the prompt runs once and its KV cache is fanned out to every response.
* :class:`PRMScorer`: the Serve deployment. Validates and tokenizes each request on its own (a bad
  request fails alone, never the batch it would have joined), then hands it to ``@serve.batch``.
* :func:`app_builder` / :func:`build_app`: the application, from a :class:`ServeConfig` (YAML
  args of ``serve run``, or the flags of ``jobs/serve_scorer.py``).

The numbers returned equal :meth:`ImplicitPRM.score` on the same (prompt, response) (tested to
1e-5 over HTTP); docs/serving.md has the API, the measured throughput and the config knobs.
"""

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from prm_ray.config import ConfigError, from_dict, to_dict
from prm_ray.prm import PRM_CARD, ImplicitPRM, StepScores, TokenizedItem
from prm_ray.reward import AGGREGATIONS, _forward_kwargs, aggregate, q_values, step_rewards, token_rewards
from prm_ray.tasks.base import last_boxed

logger = logging.getLogger("ray.serve")

DEFAULT_BETA = 0.05
TOKEN_ENV = "PRM_RAY_SERVE_TOKEN"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class AutoscalingConfig:
    """Serve's replica autoscaling (replaces ``num_replicas`` when set)."""

    min_replicas: int = 1
    max_replicas: int = 2
    # Requests in flight per replica that autoscaling aims for. One full batch per replica keeps
    # the model busy without letting queues (and latency) grow.
    target_ongoing_requests: float = 32.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                              f"got {self.min_replicas}, {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"autoscaling.target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")


@dataclass
class ServeConfig:
    """Serve an implicit PRM over HTTP (POST /score, POST /rerank, GET /health)."""

    prm: str  # the PRM checkpoint (Hugging Face directory)
    # The reference model; None scores "w/o ref" (paper Table 4: beta * log pi_phi).
    ref: str | None = None
    # None: the beta the PRM was trained with (its prm_ray_prm.json), else 0.05.
    beta: float | None = None
    aggregation: str = "min"  # the default when a request names none
    dtype: str = "float32"
    step_separator: str = "\n\n"
    chat_template: bool = True
    # Responses per forward pass (a /rerank request of N responses counts N).
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    # Requests a replica accepts at once; None: max(64, 2 x max_batch_size), so the next batch
    # fills while the current one runs. Small values make Serve's router back off and retry
    # (measured: 12 s p50 at max_ongoing_requests 2 under 64 clients).
    max_ongoing_requests: int | None = None
    max_responses: int = 64  # per /rerank request
    max_chars: int = 16384  # per text field
    max_steps: int = 256  # per `steps` list
    # Run a shared prompt once and fan its KV cache out, when that cuts the padded token count
    # of a batch by at least share_prompt_min_saving (docs/serving.md has the measurement).
    share_prompt: bool = True
    share_prompt_min_saving: float = 0.25
    vote_coef: float = 0.001  # weighted vote: sigmoid(vote_coef * score), the paper's eval value
    num_replicas: int = 1
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; > 0 puts the models on CUDA
    torch_threads: int | None = None  # None: max(1, int(num_cpus))
    host: str = "127.0.0.1"  # HTTP bind address; serve-config files set it in http_options
    port: int = 8000
    name: str = "prm-scorer"  # the Serve application name
    route_prefix: str = "/"
    auth_token_env: str = TOKEN_ENV  # bearer-token auth is on when this variable is set
    ray_address: str | None = None  # jobs/serve_scorer.py: None starts or joins a local Ray

    def __post_init__(self) -> None:
        if not self.prm:
            raise ConfigError("config field 'prm' must name a PRM checkpoint")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ConfigError(f"dtype must name a torch dtype (float32, bfloat16, ...), got {self.dtype!r}")
        if not self.step_separator:
            raise ConfigError("step_separator must be a non-empty string")
        for name in ("max_batch_size", "max_responses", "max_chars", "max_steps", "num_replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise ConfigError(f"batch_wait_timeout_s must be in [0, 10], got {self.batch_wait_timeout_s}")
        if not 0 <= self.share_prompt_min_saving < 1:
            raise ConfigError(f"share_prompt_min_saving must be in [0, 1), got {self.share_prompt_min_saving}")
        if not (math.isfinite(self.vote_coef) and self.vote_coef > 0):
            raise ConfigError(f"vote_coef must be a finite number > 0, got {self.vote_coef}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix must start with '/', got {self.route_prefix!r}")

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or max(64, 2 * self.max_batch_size)

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))


def checkpoint_beta(prm_path: str) -> float | None:
    """The beta a PRM was trained with, from the card prm_ray.train writes next to it."""
    card = Path(prm_path) / PRM_CARD
    if not card.is_file():
        return None
    try:
        beta = json.loads(card.read_text()).get("beta")
    except (OSError, ValueError, AttributeError):
        return None
    return float(beta) if isinstance(beta, (int, float)) and beta > 0 else None


def check_implicit(prm_path: str) -> None:
    """The service serves implicit PRMs: the batcher's shared-prompt plan and the token rewards of
    /score are implicit-PRM math. An explicit (step-labelled, Math-Shepherd) checkpoint is refused."""
    card = Path(prm_path) / PRM_CARD
    if card.is_file() and json.loads(card.read_text()).get("kind") == "explicit":
        raise ConfigError(f"prm: {prm_path} is an explicit (step-labelled) PRM; the service serves implicit "
                          "PRMs. Score it in process with prm_ray.prm.load_prm")


def load_prm(cfg: ServeConfig) -> ImplicitPRM:
    """The PRM a replica serves: beta from the config, else the checkpoint's card, else 0.05."""
    check_implicit(cfg.prm)
    beta = cfg.beta or checkpoint_beta(cfg.prm) or DEFAULT_BETA
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    return ImplicitPRM.from_pretrained(cfg.prm, ref_path=cfg.ref, beta=beta, step_separator=cfg.step_separator,
                                       aggregation=cfg.aggregation, device=device, dtype=cfg.dtype)


# ---------------------------------------------------------------------------------------------
# Batched scoring (pure PyTorch)
# ---------------------------------------------------------------------------------------------


@dataclass
class ScoreJob:
    """One request's worth of work: its tokenized responses and how to aggregate them."""

    items: list[TokenizedItem]
    aggregation: str = "min"


def job_size(jobs: Sequence[ScoreJob]) -> int:
    """Batch size in responses, so a /rerank of N fills N slots of ``max_batch_size``."""
    return sum(len(j.items) for j in jobs)


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
            # Only the cache is needed from the prompt pass; skip its LM head where the model allows.
            keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_kwargs(model) else {}
            out = model(input_ids=ctx_ids, attention_mask=ctx_mask, use_cache=True, **keep)
            cache = out.past_key_values
            cache.reorder_cache(index)  # one cache row per response (a gather, like beam search)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                           use_cache=True).logits[:, :-1]  # column j predicts response token j
            mask = target_mask.to(dev)
            rows = logits[mask]
            lp = torch.log_softmax(rows.to(torch.promote_types(rows.dtype, torch.float32)), dim=-1)
            lp = lp.gather(-1, ids[:, 1:][mask][:, None]).squeeze(-1)
            return torch.zeros(mask.shape, dtype=lp.dtype, device=dev).masked_scatter(mask, lp)

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
        num_steps = max(len(it.steps) for it in items)
        step_r, step_mask = step_rewards(tok_r, step_ids, num_steps)
        q = q_values(step_r, step_mask)
        scores = {m: aggregate(step_r, step_mask, m).tolist() for m in set(aggregations)}
        step_r, q = step_r.tolist(), q.tolist()
        out = []
        for b, (it, method) in enumerate(zip(items, aggregations)):
            n_steps, start = len(it.steps), starts[b]
            out.append(StepScores(
                steps=list(it.steps), step_rewards=step_r[b][:n_steps], q_values=q[b][:n_steps],
                token_rewards=tok_r[b, start : start + it.num_response_tokens].tolist(),
                num_tokens=it.num_response_tokens, score=scores[method][b], aggregation=method))
        return out

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


# ---------------------------------------------------------------------------------------------
# Requests: validation that names the field
# ---------------------------------------------------------------------------------------------


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
    from typing import Annotated, Literal

    from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

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
        steps: Annotated[list[Step], Field(min_length=1, max_length=cfg.max_steps)] | None = None
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

    return ScoreRequest, RerankRequest, StepScoresOut, RerankResponse, Health


def as_dict(s: StepScores, with_tokens: bool) -> dict:
    d = {"steps": s.steps, "step_rewards": s.step_rewards, "q_values": s.q_values, "score": s.score,
         "aggregation": s.aggregation, "num_tokens": s.num_tokens}
    if with_tokens:
        d["token_rewards"] = s.token_rewards
    return d


def weighted_vote(answers: Sequence[str | None], scores: Sequence[float], coef: float,
                  weighted: bool = True) -> dict | None:
    """The (weighted) majority answer; None when no response has an extractable answer.

    Weights are ``sigmoid(coef * score)`` (prm_ray.metrics.sigmoid_weights); ties go to the
    answer whose best response scores highest, then to the first seen, so the pick is deterministic.
    """
    from prm_ray.metrics import sigmoid_weights

    w = sigmoid_weights(scores, coef).tolist() if weighted else [1.0] * len(scores)
    totals: dict[str, float] = {}
    best: dict[str, float] = {}
    for a, wi, s in zip(answers, w, scores):
        if a is None or a == "":
            continue
        totals[a] = totals.get(a, 0.0) + wi
        best[a] = max(best.get(a, -math.inf), s)
    if not totals:
        return None
    top = max(totals.values())
    tied = [a for a, t in totals.items() if math.isclose(t, top, rel_tol=1e-12, abs_tol=1e-15)]
    answer = max(tied, key=lambda a: best[a])  # max keeps the first of equal keys
    return {"answer": answer, "weight": totals[answer], "weights": totals, "weighted": weighted}


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------

try:
    from ray import serve
except ImportError:  # pragma: no cover - ray[serve] is a dependency
    serve = None


def _token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@serve.deployment
@serve.ingress()
class PRMScorer:
    """One replica: the models, a per-request validator/tokenizer, and a batch queue.

    Python callers get the same API as HTTP through a handle:
    ``await handle.score.remote(prompt=..., response=...)``; invalid input raises
    :class:`InvalidRequest` naming the field.
    """

    def __init__(self, config: dict, token_sha256: str | None = None) -> None:
        self.cfg = from_dict(ServeConfig, config)
        torch.set_num_threads(self.cfg.threads)
        self.prm = load_prm(self.cfg)
        self.scorer = BatchScorer(self.prm, share_prompt=self.cfg.share_prompt,
                                  min_saving=self.cfg.share_prompt_min_saving)
        # The token travels as a hash, so it never shows in Serve's config or dashboard; a
        # replica started with the variable in its own environment reads it directly.
        env_token = os.environ.get(self.cfg.auth_token_env)
        self.token_sha256 = token_sha256 or (_token_sha256(env_token) if env_token else None)
        (self.ScoreRequest, self.RerankRequest, self.StepScoresOut, self.RerankResponse,
         self.Health) = request_models(self.cfg)
        self._batch.set_max_batch_size(self.cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batches = 0  # counted for the stats endpoint (how full batches run)
        self.batched_responses = 0
        self.plans: dict[str, int] = defaultdict(int)

    # -- scoring -------------------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=job_size)
    async def _batch(self, jobs: list[ScoreJob]) -> list[list[StepScores]]:
        items = [it for j in jobs for it in j.items]
        plan = self.scorer.plan(items)
        self.batches += 1
        self.batched_responses += len(items)
        self.plans[plan] += 1
        # The forward runs in a thread so the event loop keeps accepting and tokenizing requests
        # for the next batch meanwhile (torch releases the GIL in its kernels).
        return await asyncio.to_thread(self.scorer.score_jobs, jobs, plan)

    async def _score_items(self, items: list[TokenizedItem], aggregation: str) -> list[StepScores]:
        # A request larger than a batch is split: Serve rejects any single entry over max_batch_size.
        size = self.cfg.max_batch_size
        parts = await asyncio.gather(*(self._batch(ScoreJob(items[i : i + size], aggregation))
                                       for i in range(0, len(items), size)))
        return [s for part in parts for s in part]

    def _encode(self, prompt: str, response: str, where: str) -> TokenizedItem:
        try:
            return self.prm.encode(prompt, response, chat_template=self.cfg.chat_template)
        except ValueError as exc:  # too long for the model: say which field and by how much
            raise InvalidRequest(where, str(exc).replace("item is", "the prompt plus this text is")) from None
        except Exception as exc:  # the tokenizer refused the text: still the caller's input
            raise InvalidRequest(where, f"cannot be tokenized: {exc}") from None

    async def _score(self, req) -> dict:
        if (req.response is None) == (req.steps is None):
            raise InvalidRequest("response", "give exactly one of 'response' or 'steps'")
        if req.steps is not None:
            text, where = self.cfg.step_separator.join(req.steps), "steps"
        else:
            text, where = req.response, "response"
        item = self._encode(req.prompt, text, where)
        if req.steps is not None and len(item.steps) != len(req.steps):
            raise InvalidRequest("steps", f"{len(req.steps)} steps were given but the tokenizer's token "
                                          f"boundaries merge them into {len(item.steps)}")
        (result,) = await self._score_items([item], req.aggregation)
        return as_dict(result, req.token_rewards)

    async def _rerank(self, req) -> dict:
        items = [self._encode(req.prompt, r, f"responses[{i}]") for i, r in enumerate(req.responses)]
        results = await self._score_items(items, req.aggregation)
        scores = [r.score for r in results]
        answers = [last_boxed(r) for r in req.responses]
        answers = [a.strip() if a is not None else None for a in answers]
        return {
            "scores": scores,
            "best_index": max(range(len(scores)), key=scores.__getitem__),  # first of equal scores
            "answers": answers,
            "vote": weighted_vote(answers, scores, req.vote_coef, req.weighted_vote),
            "results": [as_dict(r, req.token_rewards) for r in results],
        }

    def _validate(self, model, fields: dict):
        from pydantic import ValidationError

        try:
            return model.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors(include_input=False)[0]
            raise InvalidRequest(field_name(err["loc"]), err["msg"].removeprefix("Value error, ")) from None

    # -- Python handle API ---------------------------------------------------------------------

    async def score(self, **fields) -> dict:
        """Handle API of POST /score: ``handle.score.remote(prompt=..., response=...)``."""
        return await self._score(self._validate(self.ScoreRequest, fields))

    async def rerank(self, **fields) -> dict:
        """Handle API of POST /rerank: ``handle.rerank.remote(prompt=..., responses=[...])``."""
        return await self._rerank(self._validate(self.RerankRequest, fields))

    def health(self) -> dict:
        return {"status": "ok", "model": self.cfg.prm, "reference": self.cfg.ref, "beta": self.prm.beta}

    def stats(self) -> dict:
        """How batching went: the bench reads the mean batch size and the plans used."""
        return {"batches": self.batches, "responses": self.batched_responses,
                "mean_batch": self.batched_responses / max(1, self.batches), "plans": dict(self.plans)}

    # -- HTTP ----------------------------------------------------------------------------------

    def __serve_build_asgi_app__(self):
        return build_fastapi(self)


def build_fastapi(scorer: PRMScorer):
    """The HTTP face of a replica: routes, auth, body limits, and 4xx errors that name the field."""
    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    cfg = scorer.cfg
    ScoreRequest, RerankRequest = scorer.ScoreRequest, scorer.RerankRequest
    # The largest honest body: every text field at max_chars, each char escaped (\\uXXXX = 6 bytes).
    max_body = (cfg.max_responses + 2) * (cfg.max_chars * 6 + 64) + 4096

    class ScorerRequest(Request):
        async def body(self) -> bytes:
            if not hasattr(self, "_body"):
                chunks, size = [], 0
                async for chunk in self.stream():
                    size += len(chunk)
                    if size > max_body:
                        raise HTTPException(413, detail={"field": "body", "error": f"body: larger than "
                                                         f"{max_body} bytes (max_chars {cfg.max_chars}, "
                                                         f"max_responses {cfg.max_responses})"})
                    chunks.append(chunk)
                self._body = b"".join(chunks)
            return self._body

        async def json(self) -> Any:
            if not hasattr(self, "_json"):
                # surrogateescape keeps invalid UTF-8 bytes as lone surrogates inside the strings
                # that held them, so validation reports the field instead of a bare 400.
                self._json = json.loads((await self.body()).decode("utf-8", "surrogateescape"))
            return self._json

    class ScorerRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request):
                return await handler(ScorerRequest(request.scope, request.receive))

            return route

    app = FastAPI(title="prm-ray scorer", version="1",
                  description="Step-level rewards from an implicit PRM (prm_ray.serve; docs/serving.md).")
    app.router.route_class = ScorerRoute

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc: RequestValidationError):
        errors = []
        for e in exc.errors():
            name = field_name(e.get("loc", ()))
            if e.get("type") == "json_invalid":
                name = "body"
                msg = f"not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})"
            else:  # pydantic prefixes our own validators' messages; the field name says enough
                msg = e.get("msg", "invalid").removeprefix("Value error, ")
            errors.append({"field": name, "error": msg, "type": e.get("type")})
        first = errors[0] if errors else {"field": "body", "error": "invalid request"}
        return JSONResponse({"error": f"{first['field']}: {first['error']}", "field": first["field"],
                             "errors": errors}, status_code=422)

    @app.exception_handler(InvalidRequest)
    async def on_invalid(request, exc: InvalidRequest):
        return JSONResponse({"error": str(exc), "field": exc.field, "errors": [
            {"field": exc.field, "error": exc.message, "type": "value_error"}]}, status_code=422)

    @app.exception_handler(HTTPException)
    async def on_http(request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, dict) else {"error": str(exc.detail)}
        return JSONResponse(detail, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def authorize(authorization: str | None = Header(default=None)) -> None:
        if scorer.token_sha256 is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(_token_sha256(token.strip()),
                                                                  scorer.token_sha256):
            raise HTTPException(401, detail={"field": "Authorization", "error": "Authorization: a valid "
                                             "'Bearer <token>' header is required"},
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health", response_model=scorer.Health)
    def health():
        return scorer.health()

    @app.post("/score", response_model=scorer.StepScoresOut, dependencies=[Depends(authorize)],
              responses={401: {}, 413: {}, 422: {}})
    async def score(body: ScoreRequest):  # type: ignore[valid-type]
        # Returned as a ready JSONResponse: FastAPI would otherwise re-validate every float.
        return JSONResponse(await scorer._score(body))

    @app.post("/rerank", response_model=scorer.RerankResponse, dependencies=[Depends(authorize)],
              responses={401: {}, 413: {}, 422: {}})
    async def rerank(body: RerankRequest):  # type: ignore[valid-type]
        return JSONResponse(await scorer._rerank(body))

    @app.get("/stats", dependencies=[Depends(authorize)])
    def stats():
        return scorer.stats()

    return app


# ---------------------------------------------------------------------------------------------
# Building the application
# ---------------------------------------------------------------------------------------------


def _nest(args: dict[str, Any]) -> dict[str, Any]:
    """``{"autoscaling.max_replicas": "4"}`` (serve run CLI args) -> nested mappings."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        *parents, leaf = str(key).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg``: the deployment with its replicas, resources and batch."""
    check_implicit(cfg.prm)
    options: dict[str, Any] = {
        "name": "PRMScorer",
        "max_ongoing_requests": cfg.ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = to_dict(cfg.autoscaling)
    else:
        options["num_replicas"] = cfg.num_replicas
    token = os.environ.get(cfg.auth_token_env)
    return PRMScorer.options(**options).bind(to_dict(cfg), _token_sha256(token) if token else None)


def app_builder(args: dict[str, Any]):
    """``serve run prm_ray.serve:app_builder prm=<ckpt> ref=<policy>`` or ``import_path`` in a config file.

    ``args`` are :class:`ServeConfig` fields (dotted keys for nested ones).
    """
    return build_app(with_absolute_paths(from_dict(ServeConfig, _nest(dict(args)))))


def with_absolute_paths(cfg: ServeConfig) -> ServeConfig:
    """Local model paths made absolute where they were written: replicas may start in another
    directory (a Serve config is built on the cluster). Hub ids and missing paths are kept."""
    paths = {k: os.path.abspath(v) for k in ("prm", "ref")
             if isinstance(v := getattr(cfg, k), str) and not os.path.isabs(v) and os.path.exists(v)}
    return dataclasses.replace(cfg, **paths) if paths else cfg
