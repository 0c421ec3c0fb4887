"""The Ray Serve deployment that scores responses step by step with an implicit PRM.

    serve run cluster/serve_scorer.yaml
    python jobs/serve_scorer.py --prm runs/prm-ce --ref artifacts/policy
    serve run --name prm-scorer prm_ray.serve:app_builder prm=runs/prm-ce reference_model=artifacts/policy
    curl -s localhost:8000/score -H 'content-type: application/json' \\
        -d '{"prompt": "7+5*3", "response": "Step 1: 7+5 = 2\\n\\nStep 2: 2*3 = 6\\n\\nThe answer is \\\\boxed{6}"}'

Three layers, each usable on its own: :class:`prm_ray.serve.batcher.BatchScorer` (pure PyTorch, one
forward per model per batch), :class:`PRMScorer` (the deployment: validates and tokenizes each
request on its own, so a bad request fails alone, never the batch it would have joined, then hands
it to ``@serve.batch``), and :func:`app_builder` / :func:`build_app` (the application, from a
:class:`prm_ray.serve.config.ServeConfig`).

The numbers returned equal :meth:`ImplicitPRM.score` on the same (prompt, response) (tested to
1e-5 over HTTP); docs/serving.md has the API, the measured throughput and the config knobs.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations at
# runtime, and the request models are local to build_fastapi.
import asyncio
import hashlib
import hmac
import json
import os
from collections import defaultdict
from typing import Any

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from ray import serve

from prm_ray.config import from_dict, nest, to_dict
from prm_ray.core.metrics import score_coefficient
from prm_ray.scoring import StepScores
from prm_ray.serve.batcher import BatchScorer, ScoreJob, job_size, padded_tokens, split_jobs
from prm_ray.serve.config import ServeConfig, check_implicit, check_token_budget, load_scorer_prm, resolved_config
from prm_ray.serve.schemas import InvalidRequest, as_dict, field_name, request_models, vote_keys, weighted_vote
from prm_ray.tasks import get_task, last_boxed
from prm_ray.tokens import TokenizedItem

__all__ = ["ALIASES", "PRMScorer", "app_builder", "build_app", "build_fastapi", "scorer_handle"]

ALIASES = {"ref": "reference_model"}
"""Short names the job flags and ``serve run`` args accept for fields."""


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
        torch.set_num_threads(self.cfg.torch_threads)
        self.prm = load_scorer_prm(self.cfg)
        self._beta = getattr(self.prm, "beta", 1.0)  # an explicit PRM's scores are no scaled log-ratio
        # vote_groups math: the rollout verifier's answer grouping (a math-verify pool, started on first use)
        self._grouper = get_task("math") if self.cfg.vote_groups == "math" else None
        self.scorer = BatchScorer(self.prm, share_prompt=self.cfg.share_prompt,
                                  min_saving=self.cfg.share_prompt_min_saving)
        # The token travels as a hash, so it never shows in Serve's config or dashboard; a
        # replica started with the variable in its own environment reads it directly.
        env_token = os.environ.get(self.cfg.auth_token_env)
        self.token_sha256 = token_sha256 or (_token_sha256(env_token) if env_token else None)
        (self.ScoreRequest, self.RerankRequest, self.StepScoresOut, self.RerankResponse,
         self.Health) = request_models(self.cfg)
        self._batch.set_max_batch_size(self.cfg.max_batch_tokens or self.cfg.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self.batches = 0  # counted for the stats endpoint (how full batches run)
        self.batched_responses = 0
        self.plans: dict[str, int] = defaultdict(int)
        self.batch_sizes: dict[int, int] = defaultdict(int)  # responses per batch -> batches
        self.batch_tokens: dict[int, int] = defaultdict(int)  # padded tokens per batch, by power of 2 -> batches

    # -- scoring -------------------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=job_size)
    async def _batch(self, jobs: list[ScoreJob]) -> list[list[StepScores]]:
        items = [it for j in jobs for it in j.items]
        plan = self.scorer.plan(items)
        self.batches += 1
        self.batched_responses += len(items)
        self.plans[plan] += 1
        self.batch_sizes[len(items)] += 1
        self.batch_tokens[1 << max(0, padded_tokens(items) - 1).bit_length()] += 1
        # The forward runs in a thread so the event loop keeps accepting and tokenizing requests
        # for the next batch meanwhile (torch releases the GIL in its kernels).
        return await asyncio.to_thread(self.scorer.score_jobs, jobs, plan)

    async def _score_items(self, items: list[TokenizedItem], aggregation: str) -> list[StepScores]:
        # A request larger than a batch is split: Serve rejects any single entry over max_batch_size.
        by_tokens = self.cfg.max_batch_tokens is not None
        parts = await asyncio.gather(*(self._batch(ScoreJob(part, aggregation, by_tokens))
                                       for part in split_jobs(items, self.cfg.max_batch_size, self.cfg.max_batch_tokens)))
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
        # math-verify runs in worker processes; the wait leaves the event loop to other requests
        keys = answers if self._grouper is None else await asyncio.to_thread(vote_keys, answers, self._grouper)
        return {
            "scores": scores,
            "best_index": max(range(len(scores)), key=scores.__getitem__),  # first of equal scores
            "answers": answers,
            "vote": weighted_vote(keys, scores, score_coefficient(req.vote_coef, self.cfg.vote_on, self._beta),
                                  req.weighted_vote),
            "results": [as_dict(r, req.token_rewards) for r in results],
        }

    def _validate(self, model, fields: dict):
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
        return {"status": "ok", "model": self.cfg.prm, "reference": self.cfg.reference_model, "beta": self.prm.beta,
                "dtype": str(next(self.prm.model.parameters()).dtype).removeprefix("torch.")}

    def stats(self) -> dict:
        """How batching went: the bench reads the mean batch size and the plans used."""
        return {"batches": self.batches, "responses": self.batched_responses,
                "mean_batch": self.batched_responses / max(1, self.batches), "plans": dict(self.plans),
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "batch_tokens_pow2": dict(sorted(self.batch_tokens.items()))}

    # -- HTTP ----------------------------------------------------------------------------------

    def __serve_build_asgi_app__(self):
        return build_fastapi(self)


def build_fastapi(scorer: PRMScorer):
    """The HTTP face of a replica: routes, auth, body limits, and 4xx errors that name the field."""
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


def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg``: the deployment with its replicas, resources and batch."""
    cfg = resolved_config(cfg)
    check_implicit(cfg.prm)
    check_token_budget(cfg)
    options: dict[str, Any] = {
        "name": "PRMScorer",
        "max_ongoing_requests": cfg.ongoing_requests,
        "ray_actor_options": cfg.ray_options(),
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = to_dict(cfg.autoscaling)
    else:
        options["num_replicas"] = cfg.replicas
    token = os.environ.get(cfg.auth_token_env)
    return PRMScorer.options(**options).bind(to_dict(cfg), _token_sha256(token) if token else None)


def app_builder(args: dict[str, Any]):
    """``serve run --name prm-scorer prm_ray.serve:app_builder prm=<ckpt> ref=<policy>``, or the
    ``import_path`` of a Serve config file.

    ``args`` are :class:`ServeConfig` fields (dotted keys for nested ones; ``ref`` for
    ``reference_model``). ``serve run`` names the application ``default`` unless given ``--name``;
    :func:`scorer_handle` finds it either way.
    """
    flat = {ALIASES.get(str(k), str(k)): v for k, v in args.items()}
    return build_app(from_dict(ServeConfig, nest(flat)))


def scorer_handle(name: str | None = None):
    """A handle to the running scorer: the application ``name``, or (None) the one application
    whose ingress deployment is :class:`PRMScorer`, whatever it was named when started."""
    if name is not None:
        return serve.get_app_handle(name)
    apps = [n for n, app in serve.status().applications.items() if "PRMScorer" in app.deployments]
    if len(apps) != 1:
        raise ValueError(f"found {len(apps)} PRM scorer applications ({', '.join(apps) or 'none'}); name one")
    return serve.get_app_handle(apps[0])
