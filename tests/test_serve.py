"""The scoring service (prm_ray.serve): HTTP results equal ImplicitPRM.score, bad input is a 4xx
naming the field, concurrent clients all get answers.

One Serve application for the module on the session's Serve (tiny random Llamas from conftest),
deleted at the end so its replica's CPUs return to the other modules.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from prm_ray.artifacts import PRM_CARD
from prm_ray.config import ConfigError
from prm_ray.core import reward
from prm_ray.scoring import ImplicitPRM
from prm_ray.serve import ServeConfig, app_builder, batcher, build_app
from prm_ray.serve.batcher import BatchScorer, ScoreJob, job_size, padded_tokens, split_jobs
from prm_ray.serve.config import checkpoint_beta
from prm_ray.serve.schemas import InvalidRequest, field_name, weighted_vote

BETA = 0.5
TOKEN = "test-token-123"
TOKEN_ENV = "PRM_RAY_TEST_SERVE_TOKEN"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_CHARS = 200
MAX_RESPONSES = 8
TOKEN_BUDGET = 512  # padded tokens per batch: 2x the tiny models' context of 256
PROMPTS = ["7+5*3", "2-4", "9*9+1-3", "1+1"]
RESPONSES = [
    "Step 1: 7+5 = 2\n\nStep 2: 2*3 = 6\n\nThe answer is \\boxed{6}",
    "Step 1: 2-4 = 8\n\nThe answer is \\boxed{8}",
    "Step 1: 9*9 = 1\n\nStep 2: 1+1 = 2\n\nStep 3: 2-3 = 9\n\nThe answer is \\boxed{9}",
    "1+1 = 2, so \\boxed{2}.",
]
# Long enough that running it once for all responses saves well over 25% of the padded tokens.
LONG_PROMPT = "Compute left to right, mod 10, one step per line. " * 2 + "7+5*3"


@pytest.fixture(scope="module")
def prm(tiny_prm_path, tiny_policy_path) -> ImplicitPRM:
    return ImplicitPRM.from_pretrained(tiny_prm_path, ref_path=tiny_policy_path, beta=BETA)


@pytest.fixture(scope="module")
def service(serve_instance, tiny_prm_path, tiny_policy_path):
    """(base url, handle) of one scorer; its application is deleted afterwards."""
    from ray import serve

    cfg = ServeConfig(prm=tiny_prm_path, reference_model=tiny_policy_path, beta=BETA, max_batch_size=8,
                      batch_wait_timeout_s=0.01, max_responses=MAX_RESPONSES, max_chars=MAX_CHARS,
                      num_cpus=0.5, auth_token_env=TOKEN_ENV, name="prm-scorer-test", dtype="float32",
                      max_batch_tokens=TOKEN_BUDGET)
    os.environ[TOKEN_ENV] = TOKEN  # read by build_app (the replica gets only its hash)
    try:
        handle = serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    finally:
        del os.environ[TOKEN_ENV]
    yield serve_instance, handle
    serve.delete(cfg.name)


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service[0], headers=AUTH, timeout=60) as c:
        yield c


def _assert_same(got: dict, want, tol: float = 1e-5) -> None:
    assert got["steps"] == want.steps
    assert got["num_tokens"] == want.num_tokens
    assert got["aggregation"] == want.aggregation
    assert got["score"] == pytest.approx(want.score, abs=tol)
    assert got["step_rewards"] == pytest.approx(want.step_rewards, abs=tol)
    assert got["q_values"] == pytest.approx(want.q_values, abs=tol)


# -- without Ray ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked_head", [True, False])
def test_shared_prompt_path_equals_in_process_score(prm, chunked_head, monkeypatch):
    """The KV-cache fan-out (prompt once, responses on top) gives ImplicitPRM.score's numbers,
    through the chunked LM head and through the model's own logits (models without a plain head)."""
    prompts = [LONG_PROMPT] * 3 + ["2-4"] * 2 + ["1+1"]
    responses = RESPONSES[:3] + RESPONSES[1:3] + ["x"]
    items = [prm.encode(p, r) for p, r in zip(prompts, responses)]
    want = prm.score(prompts, responses, aggregation="sum")  # the chunked head
    if not chunked_head:
        for module in (reward, batcher):
            monkeypatch.setattr(module, "head_and_trunk", lambda model: None)
    scorer = BatchScorer(prm, share_prompt=True, min_saving=0.0)
    assert scorer.plan(items) == "shared"
    for plan in ("shared", "full"):
        for got, w in zip(scorer.score_items(items, ["sum"] * len(items), plan=plan), want):
            assert got.steps == w.steps and got.num_tokens == w.num_tokens
            assert got.token_rewards == pytest.approx(w.token_rewards, abs=1e-5)
            assert got.step_rewards == pytest.approx(w.step_rewards, abs=1e-5)
            assert got.score == pytest.approx(w.score, abs=1e-5)
    # Mixed aggregations in one batch, results split back per job.
    jobs = [ScoreJob(items[:3], "min"), ScoreJob(items[3:], "last_q")]
    out = scorer.score_jobs(jobs)
    assert [len(o) for o in out] == [3, 3]
    assert out[0][0].score == pytest.approx(prm.score([prompts[0]], [responses[0]], aggregation="min")[0].score,
                                            abs=1e-5)
    assert out[1][2].aggregation == "last_q"


def test_plan_falls_back_to_full_when_nothing_is_shared(prm):
    scorer = BatchScorer(prm, share_prompt=True, min_saving=0.25)
    distinct = [prm.encode(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert scorer.plan(distinct) == "full"
    same = [prm.encode(LONG_PROMPT, r) for r in RESPONSES]
    assert scorer.plan(same) == "shared"
    assert BatchScorer(prm, share_prompt=False).plan(same) == "full"


def test_requests_split_by_responses_or_by_padded_tokens(prm):
    items = [prm.encode(p, r) for p in PROMPTS for r in RESPONSES]
    longest = max(len(it.input_ids) for it in items)
    assert [len(p) for p in split_jobs(items, 5, None)] == [5, 5, 5, 1]
    parts = split_jobs(items, 5, 3 * longest)
    assert [it for p in parts for it in p] == items  # order kept, nothing dropped
    assert all(padded_tokens(p) <= 3 * longest for p in parts) and max(len(p) for p in parts) >= 3
    assert [len(p) for p in split_jobs(items, 5, 1)] == [1] * len(items)  # each alone when nothing else fits
    jobs = [ScoreJob(items[:2], by_tokens=True), ScoreJob(items[2:3], by_tokens=True)]
    assert job_size(jobs) == padded_tokens(items[:3]) and job_size([ScoreJob(items[:2])]) == 2


def test_weighted_vote_and_field_names():
    assert weighted_vote(["1", "2", "2", None], [5.0, -1.0, -1.0, 9.0], 0.001)["answer"] == "2"  # ~majority
    # Heavily weighted: one confident "1" outweighs two unlikely "2"s.
    assert weighted_vote(["1", "2", "2"], [20.0, -20.0, -20.0], 1.0)["answer"] == "1"
    assert weighted_vote(["1", "2"], [0.0, 1.0], 1.0, weighted=False)["answer"] == "2"  # tie: best score
    assert weighted_vote([None, ""], [1.0, 2.0], 1.0) is None
    assert field_name(("body", "responses", 3)) == "responses[3]"
    assert field_name(("body",)) == "body"


def test_config_errors_name_the_field(tmp_path, tiny_prm_path):
    with pytest.raises(ConfigError, match="aggregation"):
        ServeConfig(prm="x", aggregation="max")
    with pytest.raises(ConfigError, match="max_batch_size"):
        ServeConfig(prm="x", max_batch_size=0)
    with pytest.raises(ConfigError, match="beta"):
        ServeConfig(prm="x", beta=-1)
    with pytest.raises(ConfigError, match="dtype"):
        ServeConfig(prm="x", dtype="float33")
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        ServeConfig(prm="x", max_batch_tokens=0)
    with pytest.raises(ConfigError, match="vote_on"):
        ServeConfig(prm="x", vote_on="beta")
    with pytest.raises(ConfigError, match="vote_groups"):
        ServeConfig(prm="x", vote_groups="fuzzy")
    with pytest.raises(ConfigError, match=r"max_batch_tokens \(100\) must be at least the models' context \(256"):
        app_builder({"prm": tiny_prm_path, "max_batch_tokens": "100"})
    with pytest.raises(ConfigError, match="autoscaling"):
        app_builder({"prm": tiny_prm_path, "autoscaling.min_replicas": "3", "autoscaling.max_replicas": "2"})
    # serve run passes strings; dotted keys reach nested fields.
    app = app_builder({"prm": tiny_prm_path, "max_batch_size": "4", "autoscaling.max_replicas": "3"})
    assert app is not None
    assert checkpoint_beta(tiny_prm_path) is None
    (tmp_path / PRM_CARD).write_text(json.dumps({"beta": 0.1, "reference_model": None}))
    assert checkpoint_beta(str(tmp_path)) == 0.1
    (tmp_path / PRM_CARD).write_text(json.dumps({"kind": "explicit", "objective": "math-shepherd-hard"}))
    with pytest.raises(ConfigError, match="prm: .* explicit"):
        app_builder({"prm": str(tmp_path)})


# -- over HTTP -----------------------------------------------------------------------------------


def test_score_over_http_equals_in_process(client, prm):
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        agg = ("min", "sum", "mean", "last_q")[i]
        res = client.post("/score", json={"prompt": p, "response": r, "aggregation": agg, "token_rewards": True})
        assert res.status_code == 200, res.text
        want = prm.score([p], [r], aggregation=agg)[0]
        _assert_same(res.json(), want)
        assert res.json()["token_rewards"] == pytest.approx(want.token_rewards, abs=1e-5)
    # `steps` is the response split at blank lines: the same numbers.
    steps = RESPONSES[0].split("\n\n")
    got = client.post("/score", json={"prompt": PROMPTS[0], "steps": steps}).json()
    _assert_same(got, prm.score([PROMPTS[0]], [RESPONSES[0]])[0])
    assert "token_rewards" not in got


def test_rerank_over_http_equals_in_process(client, prm):
    responses = [r.replace("7+5*3", "x") for r in RESPONSES]
    res = client.post("/rerank", json={"prompt": LONG_PROMPT, "responses": responses, "aggregation": "min"})
    assert res.status_code == 200, res.text
    body = res.json()
    want = prm.score([LONG_PROMPT] * len(responses), responses, aggregation="min")
    for got, w in zip(body["results"], want):
        _assert_same(got, w)
    assert body["scores"] == pytest.approx([w.score for w in want], abs=1e-5)
    assert body["best_index"] == max(range(len(want)), key=lambda i: want[i].score)
    assert body["answers"] == ["6", "8", "9", "2"]
    assert body["vote"]["answer"] in {"6", "8", "9", "2"} and body["vote"]["weighted"]
    stats = client.get("/stats").json()
    assert stats["plans"].get("shared", 0) >= 1, stats  # this prompt is long enough to share


def test_health_and_openapi(service, client):
    health = httpx.get(service[0] + "/health").json()  # no token needed
    assert health["status"] == "ok" and health["dtype"] == "float32"  # the precision it scores in
    schema = client.get("/openapi.json").json()
    assert {"/score", "/rerank", "/health"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


def _bad_cases():
    ok = {"prompt": "1+1", "response": "2"}
    long_text = "9" * 150
    return [
        ("/score", {}, 422, "prompt"),
        ("/score", {**ok, "prompt": ""}, 422, "prompt"),
        ("/score", {**ok, "prompt": "  \n "}, 422, "prompt"),
        ("/score", {**ok, "prompt": 123}, 422, "prompt"),
        ("/score", {**ok, "prompt": "x" * (MAX_CHARS + 1)}, 422, "prompt"),
        ("/score", {"prompt": "1+1"}, 422, "response"),
        ("/score", {**ok, "steps": ["2"]}, 422, "response"),
        ("/score", {**ok, "response": ""}, 422, "response"),
        ("/score", {**ok, "response": ["2"]}, 422, "response"),
        ("/score", {**ok, "response": None, "steps": []}, 422, "steps"),
        ("/score", {"prompt": "1+1", "steps": ["a", " "]}, 422, "steps[1]"),
        ("/score", {"prompt": "1+1", "steps": ["a\n\nb"]}, 422, "steps[0]"),
        ("/score", {"prompt": "1+1", "steps": "abc"}, 422, "steps"),
        ("/score", {**ok, "aggregation": "max"}, 422, "aggregation"),
        ("/score", {**ok, "token_rewards": "yes"}, 422, "token_rewards"),
        ("/score", {**ok, "extra": 1}, 422, "extra"),
        # Each field fits max_chars, together they pass the model's 256 positions.
        ("/score", {"prompt": long_text, "response": long_text}, 422, "response"),
        ("/score", b'{"prompt": "\xff\xfe", "response": "2"}', 422, "prompt"),  # invalid UTF-8 bytes
        ("/score", b'{"prompt": "1", "response": "\\ud800"}', 422, "response"),  # lone surrogate
        ("/score", b'{"prompt": ', 422, "body"),
        ("/score", [1, 2], 422, "body"),
        ("/score", b'{"prompt": "' + b"1" * 30000 + b'"}', 413, "body"),
        ("/rerank", {"prompt": "1", "responses": []}, 422, "responses"),
        ("/rerank", {"prompt": "1", "responses": ["a"] * (MAX_RESPONSES + 1)}, 422, "responses"),
        ("/rerank", {"prompt": "1", "responses": ["a", "b", ""]}, 422, "responses[2]"),
        ("/rerank", {"prompt": "1", "responses": ["a", 5]}, 422, "responses[1]"),
        ("/rerank", {"prompt": "1", "responses": "a"}, 422, "responses"),
        ("/rerank", {"prompt": long_text, "responses": ["a", long_text]}, 422, "responses[1]"),
        ("/rerank", {"prompt": "1", "responses": ["a"], "weighted_vote": "true"}, 422, "weighted_vote"),
        ("/rerank", {"prompt": "1", "responses": ["a"], "vote_coef": -1}, 422, "vote_coef"),
        ("/rerank", b'{"prompt": "1", "responses": ["a"], "vote_coef": NaN}', 422, "vote_coef"),
        ("/rerank", {"prompt": "1", "responses": ["a"], "aggregation": 3}, 422, "aggregation"),
    ]


def test_bad_input_is_a_4xx_naming_the_field_and_the_service_survives(client, prm):
    for path, body, status, field in _bad_cases():
        if isinstance(body, bytes):
            res = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            res = client.post(path, json=body)
        assert res.status_code == status, (path, body if len(str(body)) < 300 else "...", res.text)
        assert res.json()["field"] == field, (body if len(str(body)) < 300 else "...", res.text)
        assert field in res.json()["error"]
    # No content type: FastAPI does not parse the body as JSON.
    res = client.post("/score", content=b'{"prompt": "1", "response": "2"}', headers={"content-type": ""})
    assert res.status_code == 422 and res.json()["field"] == "body"
    # Auth: missing or wrong token.
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
        res = httpx.post(str(client.base_url) + "/score", json={"prompt": "1", "response": "2"}, headers=headers)
        assert res.status_code == 401 and res.json()["field"] == "Authorization"
    # Still alive and still right.
    res = client.post("/score", json={"prompt": PROMPTS[1], "response": RESPONSES[1]})
    assert res.status_code == 200
    _assert_same(res.json(), prm.score([PROMPTS[1]], [RESPONSES[1]])[0])


def test_concurrent_clients_all_answered(service, prm):
    url = service[0]
    jobs = [(i % len(PROMPTS), i % 3 == 0) for i in range(48)]

    def call(job):
        k, rerank = job
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
            if rerank:
                return c.post("/rerank", json={"prompt": PROMPTS[k], "responses": RESPONSES})
            return c.post("/score", json={"prompt": PROMPTS[k], "response": RESPONSES[k]})

    before = httpx.get(url + "/stats", headers=AUTH).json()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs))
    assert [r.status_code for r in results] == [200] * len(jobs)
    # Batches formed up to the token budget, and the histograms account for every batch.
    stats = httpx.get(url + "/stats", headers=AUTH).json()
    assert sum(stats["batch_sizes"].values()) == sum(stats["batch_tokens_pow2"].values()) == stats["batches"]
    assert max(int(k) for k in stats["batch_tokens_pow2"]) <= TOKEN_BUDGET
    assert stats["batches"] - before["batches"] < len(jobs)  # concurrent requests shared batches
    want = {k: prm.score([PROMPTS[k]], [RESPONSES[k]])[0] for k in range(len(PROMPTS))}
    for (k, rerank), res in zip(jobs, results):
        if rerank:
            assert len(res.json()["results"]) == len(RESPONSES)
        else:
            _assert_same(res.json(), want[k])


def test_the_handle_is_found_whatever_the_application_is_called(service, prm):
    """`serve run prm_ray.serve:app_builder` names the application "default"; scorer_handle finds
    the scorer by its deployment either way."""
    from prm_ray.serve import scorer_handle

    got = scorer_handle().score.remote(prompt=PROMPTS[1], response=RESPONSES[1]).result(timeout_s=60)
    _assert_same(got, prm.score([PROMPTS[1]], [RESPONSES[1]])[0])
    assert scorer_handle("prm-scorer-test").health.remote().result(timeout_s=60)["status"] == "ok"


def test_python_handle(service, prm):
    handle = service[1]
    got = handle.score.remote(prompt=PROMPTS[0], response=RESPONSES[0]).result(timeout_s=60)
    _assert_same(got, prm.score([PROMPTS[0]], [RESPONSES[0]])[0])
    ranked = handle.rerank.remote(prompt=PROMPTS[0], responses=RESPONSES[:2]).result(timeout_s=60)
    assert len(ranked["scores"]) == 2
    with pytest.raises(InvalidRequest, match="responses\\[1\\]"):
        handle.rerank.remote(prompt="1", responses=["a", ""]).result(timeout_s=60)
