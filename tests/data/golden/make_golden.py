"""Produce the golden scores of tests/test_golden.py with the code at 1a275c9 (before issue #14's
redesign), so the redesigned code can be checked against numbers it did not compute itself.

    python tests/data/golden/make_golden.py   # at commit 1a275c9 only; kept for the record

64 (prompt, response) pairs are sampled from the shipped policy (16 arith test problems x 4, HF
generate, seed 0, the policy card's temperature) and scored, in float64, by:
- ImplicitPRM: PRM = the shipped policy, reference = the shipped policy with its final RMSNorm
  weight halved (logits / 2: a smoother reference, made without any randomness), beta 0.05;
- ImplicitPRM without a reference ("w/o ref");
- ExplicitPRM: the shipped policy read as an explicit PRM with "+"/"-" tokens;
- the Ray Data evaluation pass (reference log-probs pass + scoring pass), implicit and explicit;
- the Serve endpoint (/rerank of each prompt's 4 responses, one request at a time).
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
POLICY = ROOT / "artifacts" / "policy"
AGGS = ("min", "sum", "last_q", "mean")
BETA = 0.05


def perturbed_reference(out: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(POLICY, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(0.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(POLICY).save_pretrained(out)
    return str(out)


def sample_pairs() -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prm_ray.bootstrap import EvalConfig, sample_responses
    from prm_ray.tasks.arith import ArithTask

    card = json.loads((POLICY / "prm_ray_policy.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(POLICY, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(POLICY)
    insts = list(ArithTask().instructions("test", limit=16))
    cfg = EvalConfig(samples=4, temperature=card["rollout_temperature"], max_new_tokens=160, seed=0)
    samples = sample_responses(model, tok, [i.prompt for i in insts], cfg)
    return [{"instruction_id": inst.id, "sample_index": j, "prompt": inst.prompt, "response": text}
            for inst, resp in zip(insts, samples) for j, (text, _) in enumerate(resp)]


def as_record(scores) -> list[dict]:
    return [{"steps": s.steps, "step_rewards": s.step_rewards, "q_values": s.q_values,
             "num_tokens": s.num_tokens, "score": s.score} for s in scores]


def in_process(pairs: list[dict], ref: str) -> dict:
    from prm_ray.prm import ExplicitPRM, ImplicitPRM

    prompts, responses = [p["prompt"] for p in pairs], [p["response"] for p in pairs]
    out = {}
    for name, prm in (("implicit", ImplicitPRM.from_pretrained(str(POLICY), ref_path=ref, beta=BETA,
                                                               dtype=torch.float64)),
                      ("implicit_noref", ImplicitPRM.from_pretrained(str(POLICY), beta=BETA, dtype=torch.float64)),
                      ("explicit", ExplicitPRM.from_pretrained(str(POLICY), dtype=torch.float64))):
        out[name] = {a: as_record(prm.score(prompts, responses, aggregation=a, batch_size=16)) for a in AGGS}
    return out


def eval_pass(pairs: list[dict], ref: str, work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prm_ray.evaluate import EvaluateConfig, reference_logprobs, score

    data = work / "rollouts"
    (data / "data").mkdir(parents=True)
    rows = [{**p, "correct": False, "extracted_answer": None} for p in pairs]
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("instruction_id", pa.string()), ("sample_index", pa.int32()), ("prompt", pa.string()),
        ("response", pa.string()), ("correct", pa.bool_()), ("extracted_answer", pa.string())]))
    pq.write_table(table, data / "data" / "shard-000000.parquet")
    cfg = EvaluateConfig(dtype="float64", batch_size=16, micro_batch_size=8, replicas=1)
    reference_logprobs(data, ref, work / "ref", cfg)
    out = {}
    for name, src, c, tokens in (("implicit", work / "ref", cfg, None),
                                 ("implicit_noref", data, EvaluateConfig(dtype="float64", batch_size=16,
                                                                         micro_batch_size=8, replicas=1,
                                                                         reference=False), None),
                                 ("explicit", data, EvaluateConfig(dtype="float64", batch_size=16, micro_batch_size=8,
                                                                   replicas=1, reference=False), ["+", "-"])):
        score(src, str(POLICY), work / f"scores-{name}", c, BETA, tokens)
        got = {(r["instruction_id"], r["sample_index"]): r for r in pq.read_table(work / f"scores-{name}").to_pylist()}
        out[name] = [{"step_rewards": got[(p["instruction_id"], p["sample_index"])]["step_rewards"],
                      "q_values": got[(p["instruction_id"], p["sample_index"])]["q_values"],
                      "num_tokens": got[(p["instruction_id"], p["sample_index"])]["num_tokens"],
                      **{f"score_{a}": got[(p["instruction_id"], p["sample_index"])][f"score_{a}"] for a in AGGS}}
                     for p in pairs]
    return out


def serve_endpoint(pairs: list[dict], ref: str) -> dict:
    import httpx
    from ray import serve

    from prm_ray.serve import ServeConfig, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(prm=str(POLICY), ref=ref, beta=BETA, dtype="float64", num_cpus=0.5, name="golden")
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    out: dict[str, list] = {a: [] for a in AGGS}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for start in range(0, len(pairs), 4):
            group = pairs[start : start + 4]
            for a in AGGS:
                r = client.post("/rerank", json={"prompt": group[0]["prompt"], "aggregation": a,
                                                 "responses": [p["response"] for p in group]})
                r.raise_for_status()
                out[a].extend({"step_rewards": x["step_rewards"], "q_values": x["q_values"],
                               "num_tokens": x["num_tokens"], "score": x["score"]} for x in r.json()["results"])
    serve.shutdown()
    return out


def main() -> None:
    import tempfile

    import ray

    sys.path.insert(0, str(ROOT))
    pairs = sample_pairs()
    assert len(pairs) == 64 and all(p["prompt"] == pairs[4 * (i // 4)]["prompt"] for i, p in enumerate(pairs))
    (HERE / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    with tempfile.TemporaryDirectory() as tmp:
        ref = perturbed_reference(Path(tmp) / "ref-model")
        golden = {"commit": "1a275c9", "beta": BETA, "dtype": "float64", "in_process": in_process(pairs, ref)}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        golden["eval_pass"] = eval_pass(pairs, ref, Path(tmp))
        golden["serve"] = serve_endpoint(pairs, ref)
        ray.shutdown()
    (HERE / "scores.json").write_text(json.dumps(golden))
    print("wrote", HERE / "pairs.jsonl", HERE / "scores.json")


if __name__ == "__main__":
    main()
