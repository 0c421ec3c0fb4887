"""Load test of the PRM scoring service against in-process ImplicitPRM.score, in one run.

    python bench/serve_load.py              # about 5 minutes on 2 cores
    python bench/serve_load.py --quick      # a smoke run (short phases)
    python bench/serve_load.py --replicas 2 --out /tmp/serve_load_2replicas.json

Flags are the fields of ServeLoadConfig below (`--help` lists them with their defaults).

Workload: arith test problems, each with its reference solution and a corrupted copy (one step's
result changed), so lengths are those of real responses. Model: the shipped policy
(artifacts/policy) as both PRM and reference, so every reward is 0 but both forwards run, as in
a real deployment. Every phase is measured with the same torch thread count.

Measured, each phase a fresh deployment driven from a separate client process (aiohttp, C
concurrent connections, a warm-up excluded):
- in-process ImplicitPRM.score, batch size 1 and max_batch_size (the ceiling);
- POST /score with max_batch_size 1 (no batching) and max_batch_size 32, at saturation;
- POST /rerank with 8 responses per request (the best-of-N sampler's call);
- latency at low load (one connection);
- the shared-prompt KV fan-out against full sequences on the same batches (engine level), for
  arith prompts (short) and a few-shot prompt (long).
Writes bench/results/serve_load.json (--out) and prints a summary.
"""

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from prm_ray.cli import run_job
from prm_ray.config import param, to_dict

ROOT = Path(__file__).resolve().parent.parent

FEW_SHOT = ("Solve the chain left to right, reducing every value mod 10, one step per paragraph, "
            "and give the final value in a box. ")


QUICK = {"problems": 40, "duration": 4.0, "warmup": 2.0}
"""What `--quick` sets (over any value given for these fields); in-process phases also run 3 s, not 10."""


@dataclass
class ServeLoadConfig:
    """Load test of the PRM scoring service (Ray Serve) against in-process ImplicitPRM.score."""

    model: str = param(str(ROOT / "artifacts" / "policy"), "the model served, as both PRM and reference")
    problems: int = param(200, "arith test problems; each gives two responses (its solution and a corrupted copy)")
    # One thread: with other processes on the cores, OpenMP's barriers between threads stall
    # whenever a core is taken away, which makes 2-thread timings erratic here.
    threads: int = param(1, "torch threads, in process and per replica (ServeConfig.threads)")
    max_batch_size: int = param(32, "the service's max_batch_size, and the in-process ceiling's batch")
    max_batch_tokens: int | None = param(None, "the service's max_batch_tokens (batches capped by padded tokens "
                                               "instead of responses); null: off")
    batch_wait_timeout_s: float = param(0.01, "the service's batch_wait_timeout_s")
    concurrency: int = param(64, "concurrent client connections at saturation")
    duration: float = param(20.0, "measured seconds per service phase")
    warmup: float = param(5.0, "seconds per service phase before measuring")
    replicas: int = param(1, "replicas per deployment, each its own process (ServeConfig.replicas)")
    port: int = param(8123, "HTTP port of the service")
    out: str = param(str(ROOT / "bench" / "results" / "serve_load.json"), "results JSON")
    quick: bool = param(False, "a smoke run: problems 40, duration 4, warmup 2 (over any value given for them), "
                               "3 s in-process phases, 3 KV-sharing repetitions")
    throughput_optimized: bool = param(False, "RAY_SERVE_THROUGHPUT_OPTIMIZED=1: Serve's bundle of direct ingress "
                                              "(no proxy hop), gRPC between processes, user code on the main loop, "
                                              "frozen GC")
    client: str | None = param(None, "internal: run the load client of this spec file", hidden=True)


CONFIG, ALIASES = ServeLoadConfig, {}


def workload(problems: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs: a reference solution and a copy with one wrong step per problem."""
    from prm_ray.tasks.arith import ArithTask

    rng = random.Random(seed)
    out = []
    for inst in ArithTask().instructions("test", limit=problems):
        sol = inst.meta["solution"]
        steps = sol.split("\n\n")
        k = rng.randrange(len(steps) - 1)
        head, _, val = steps[k].rpartition("= ")
        steps[k] = f"{head}= {(int(val) + rng.randrange(1, 10)) % 10}"
        out += [(inst.prompt, sol), (inst.prompt, "\n\n".join(steps))]
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# -- the client process ---------------------------------------------------------------------------


async def _drive(url: str, payloads: list[dict], path: str, concurrency: int, duration: float,
                 warmup: float, per_request: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    done = 0
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    counter = iter(range(10**9))

    async def worker(session):
        nonlocal done
        while True:
            now = time.perf_counter()
            if now >= t_end:
                return
            body = payloads[next(counter) % len(payloads)]
            t0 = time.perf_counter()
            try:
                async with session.post(url + path, json=body) as res:
                    await res.read()
                    ok = res.status == 200
                    key = str(res.status)
            except aiohttp.ClientError as exc:
                ok, key = False, type(exc).__name__
            t1 = time.perf_counter()
            # Completions inside the window count, whenever they started: at saturation a
            # request can wait longer than the warm-up, and dropping it would undercount.
            if t_measure <= t1 <= t_end:
                if ok:
                    latencies.append(t1 - t0)
                    done += per_request
                else:
                    errors[key] = errors.get(key, 0) + 1

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return {"responses_per_s": done / duration, "requests": len(latencies), "errors": errors,
            "p50_ms": 1000 * pct(latencies, 0.5), "p99_ms": 1000 * pct(latencies, 0.99),
            "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan")}


def client_main(spec: str) -> None:
    s = json.loads(spec)
    print(json.dumps(asyncio.run(_drive(**s))))


def run_client(url, payloads, path, concurrency, duration, warmup, per_request) -> dict:
    """The load generator runs in its own process, as a trainer or sampler would."""
    spec = json.dumps(dict(url=url, payloads=payloads, path=path, concurrency=concurrency,
                           duration=duration, warmup=warmup, per_request=per_request))
    with tempfile.NamedTemporaryFile("w", prefix="serve_load_client-", suffix=".json") as spec_file:
        spec_file.write(spec)
        spec_file.flush()
        out = subprocess.run([sys.executable, __file__, "--client", spec_file.name], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- in-process baselines -------------------------------------------------------------------------


def in_process(prm, pairs, batch_size: int, min_seconds: float) -> dict:
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    prm.score(prompts[:batch_size], responses[:batch_size], batch_size=batch_size)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        prm.score(prompts, responses, batch_size=batch_size)
        n += len(pairs)
    return {"batch_size": batch_size, "responses_per_s": n / (time.perf_counter() - t0)}


def kv_sharing(prm, pairs, group: int, batch: int, reps: int) -> list[dict]:
    """Time the shared-prompt plan against full sequences on identical batches."""
    from prm_ray.serve.batcher import BatchScorer

    scorer = BatchScorer(prm, share_prompt=True, min_saving=0.0)
    by_prompt: dict[str, list[str]] = {}
    for p, r in pairs:
        by_prompt.setdefault(p, []).append(r)
    rng = random.Random(0)
    out = []
    for label, prefix in (("arith prompt", ""), ("few-shot prompt", FEW_SHOT)):
        prompts = list(by_prompt)[: batch // group]
        items = []
        for p in prompts:
            rs = by_prompt[p]
            items += [prm.encode(prefix + p, rs[rng.randrange(len(rs))]) for _ in range(group)]
        times: dict[str, list[float]] = {}
        scorer.score_items(items, ["min"] * len(items), plan="shared")  # warm-up
        # Interleaved, one batch at a time, and the fastest kept: other jobs on the machine only
        # ever add time, so the minimum is the least disturbed measurement of each plan.
        for _ in range(reps):
            for plan in ("full", "shared"):
                t0 = time.perf_counter()
                scorer.score_items(items, ["min"] * len(items), plan=plan)
                times.setdefault(plan, []).append(time.perf_counter() - t0)
        full_ms, shared_ms = 1000 * min(times["full"]), 1000 * min(times["shared"])
        full_tok = len(items) * max(len(it.input_ids) for it in items)
        shared_tok = (len(prompts) * (max(it.prompt_len for it in items) - 1)
                      + len(items) * (1 + max(it.num_response_tokens for it in items)))
        out.append({"prompt": label, "responses_per_prompt": group, "batch": len(items),
                    "prompt_tokens": max(it.prompt_len for it in items),
                    "response_tokens_max": max(it.num_response_tokens for it in items),
                    "padded_tokens_full": full_tok, "padded_tokens_shared": shared_tok,
                    "token_saving": 1 - shared_tok / full_tok, "full_ms": full_ms, "shared_ms": shared_ms,
                    "median_full_ms": 1000 * statistics.median(times["full"]),
                    "median_shared_ms": 1000 * statistics.median(times["shared"]),
                    "speedup": full_ms / shared_ms, "planner_picks": BatchScorer(prm).plan(items)})
    return out


# -- main -----------------------------------------------------------------------------------------


def run(args: ServeLoadConfig) -> dict | None:
    if args.client:
        return client_main(Path(args.client).read_text())
    if args.quick:
        args = replace(args, **QUICK)

    import torch

    from prm_ray.scoring import ImplicitPRM
    from prm_ray.serve import ServeConfig, build_app

    t_all = time.perf_counter()
    torch.set_num_threads(args.threads)
    pairs = workload(args.problems)
    results: dict = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        "workload": {"responses": len(pairs), "problems": args.problems,
                     "mean_chars": statistics.fmean(len(p) + len(r) for p, r in pairs)},
        "args": {k: v for k, v in to_dict(args).items() if k != "client"},
    }

    prm = ImplicitPRM.from_pretrained(args.model, ref_path=args.model, beta=0.05)
    seconds = 3.0 if args.quick else 10.0
    results["in_process"] = {
        "batch_1": in_process(prm, pairs, 1, seconds),
        f"batch_{args.max_batch_size}": in_process(prm, pairs, args.max_batch_size, seconds),
    }
    print("in-process:", json.dumps(results["in_process"]), flush=True)
    results["kv_sharing"] = kv_sharing(prm, pairs, group=8, batch=args.max_batch_size, reps=3 if args.quick else 8)
    print("kv sharing:", json.dumps(results["kv_sharing"], indent=1), flush=True)
    del prm

    import ray
    from ray import serve

    if args.throughput_optimized:  # read when Serve's processes start, so set before Ray starts them
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    for attempt in range(3):  # a loaded machine can time out Ray's start-up; it is not the service
        try:
            ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     log_to_driver=False, logging_level="WARNING")
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
            print(f"ray.init failed ({exc}); retrying", flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    score_payloads = [{"prompt": p, "response": r} for p, r in pairs]
    by_prompt: dict[str, list[str]] = {}
    for p, r in pairs:
        by_prompt.setdefault(p, []).append(r)
    rng = random.Random(1)
    rerank_payloads = [{"prompt": p, "responses": [rs[rng.randrange(len(rs))] for _ in range(8)]}
                       for p, rs in by_prompt.items()]

    phases = [
        ("score_batch_1", dict(max_batch_size=1, max_batch_tokens=None), "/score", score_payloads, args.concurrency, 1),
        (f"score_batch_{args.max_batch_size}", {}, "/score", score_payloads, args.concurrency, 1),
        ("score_low_load", {}, "/score", score_payloads, 1, 1),
        (f"rerank8_batch_{args.max_batch_size}", {}, "/rerank", rerank_payloads, 16, 8),
    ]
    results["service"] = {}
    for name, overrides, path, payloads, conc, per in phases:
        fields = dict(prm=args.model, reference_model=args.model, beta=0.05, max_batch_size=args.max_batch_size,
                      batch_wait_timeout_s=args.batch_wait_timeout_s, num_cpus=1, threads=args.threads,
                      replicas=args.replicas, name="prm-scorer-bench", max_batch_tokens=args.max_batch_tokens)
        cfg = ServeConfig(**{**fields, **overrides})
        t0 = time.perf_counter()
        handle = serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
        start_s = time.perf_counter() - t0
        res = run_client(url, payloads, path, conc, args.duration, args.warmup, per)
        stats = handle.stats.remote().result()
        res.update(concurrency=conc, responses_per_request=per, deploy_s=start_s, max_batch_size=cfg.max_batch_size,
                   mean_batch=stats["mean_batch"], plans=stats["plans"], batch_sizes=stats["batch_sizes"],
                   batch_tokens_pow2=stats["batch_tokens_pow2"], max_batch_tokens=cfg.max_batch_tokens)
        results["service"][name] = res
        print(name, json.dumps(res), flush=True)
        serve.delete(cfg.name)
    serve.shutdown()
    ray.shutdown()

    # The machine is shared and its load drifts: measure the in-process ceiling again and use the
    # mean of before and after.
    prm = ImplicitPRM.from_pretrained(args.model, ref_path=args.model, beta=0.05)
    results["in_process_after"] = {f"batch_{args.max_batch_size}": in_process(prm, pairs, args.max_batch_size,
                                                                              seconds)}
    print("in-process (after):", json.dumps(results["in_process_after"]), flush=True)

    key = f"batch_{args.max_batch_size}"
    ip = (results["in_process"][key]["responses_per_s"] + results["in_process_after"][key]["responses_per_s"]) / 2
    svc = results["service"]
    b1 = svc["score_batch_1"]["responses_per_s"]
    bN = svc[f"score_batch_{args.max_batch_size}"]["responses_per_s"]
    rr = svc[f"rerank8_batch_{args.max_batch_size}"]["responses_per_s"]
    results["targets"] = {
        "batching_speedup_score": bN / b1 if b1 else None,
        "batching_speedup_rerank8": rr / b1 if b1 else None,
        "service_vs_in_process_score": bN / ip,
        "service_vs_in_process_rerank8": rr / ip,
        "batching_3x_met": bool(b1 and max(bN, rr) / b1 >= 3),
        "in_process_75pct_met_score": bN / ip >= 0.75,
        "in_process_75pct_met_rerank8": rr / ip >= 0.75,
    }
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - t_all
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results["targets"], indent=2))
    print(f"wrote {args.out} in {results['total_s']:.0f} s")
    return results


def main(argv=None) -> dict | None:
    return run_job(run, CONFIG, argv, aliases=ALIASES, description=__doc__)


if __name__ == "__main__":
    main()
