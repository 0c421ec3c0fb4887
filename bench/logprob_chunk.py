"""The chunked LM head on a CPU: a training step and scoring with `logprob_chunk` 1024 against 0
(the model's full logits), interleaved in one process so the machine's noise hits both alike.

    python bench/logprob_chunk.py              # the shipped policy, 1 thread (~1 min)
    python bench/logprob_chunk.py --quick      # a smoke run (tests run it)

- **training**: `stages.train.step.micro_batch_loss` (CE, 16 arith solutions, bf16 autocast where
  the CPU has native bf16, else fp32) + backward + AdamW. Chunked, backward recomputes each chunk's
  logits.
- **scoring**: `core.reward.response_logprobs` of 32 arith solutions under inference mode, in
  bfloat16 and float32.

The chunked head exists for accelerators, where `[tokens, vocab]` float32 logits of a 32k-128k
vocabulary are gigabytes; the point here is that CPU runs do not pay for it. Writes `out` (JSON)
and prints the medians (docs/bench_train.md).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from prm_ray.cli import run_job  # noqa: E402
from prm_ray.config import param  # noqa: E402
from prm_ray.core.reward import LOGPROB_CHUNK, response_logprobs  # noqa: E402
from prm_ray.models import load_causal_lm, load_tokenizer  # noqa: E402
from prm_ray.resources import Resources, resolve_dtype  # noqa: E402
from prm_ray.stages.train import TrainConfig  # noqa: E402
from prm_ray.stages.train.examples import tokenize_examples  # noqa: E402
from prm_ray.stages.train.step import StepContext, micro_batch_loss  # noqa: E402
from prm_ray.tasks.arith import ArithTask  # noqa: E402
from prm_ray.tokens import collate_items, encode_pair, pad_token_id  # noqa: E402

CHUNKS = (0, LOGPROB_CHUNK)


@dataclass
class LogprobChunkBenchConfig:
    """The chunked LM head against full logits on this CPU, training and scoring (docs/bench_train.md)."""

    quick: bool = param(False, "a smoke run: 2 rounds")
    rounds: int = param(20, "interleaved rounds; each times every setting once (the first 2 are warm-up)")
    policy: str = param(str(ROOT / "artifacts" / "policy"), "the model")
    out: str = param(str(ROOT / "bench" / "results" / "logprob_chunk.json"), "results JSON")

    def __post_init__(self) -> None:
        if self.quick:
            self.rounds = 3


CONFIG, ALIASES = LogprobChunkBenchConfig, {}


def run(cfg: LogprobChunkBenchConfig) -> dict:
    torch.set_num_threads(1)
    tok = load_tokenizer(cfg.policy)
    insts = list(ArithTask().instructions("train", limit=32))
    prompts, responses = [i.prompt for i in insts], [i.meta["solution"] for i in insts]
    train_rows = tokenize_examples(pa.table({"prompt": prompts[:16], "response": responses[:16],
                                             "ref_logp": [0.0] * 16, "label": [j % 2 for j in range(16)]}), tok)
    score_batch = collate_items([encode_pair(tok, p, r) for p, r in zip(prompts, responses)], pad_token_id(tok))
    precision = resolve_dtype("auto", 0)
    work = {}  # setting -> a function timing one call
    for chunk in CHUNKS:
        tcfg = TrainConfig(micro_batch_size=16, global_batch_size=16, workers=Resources(replicas=1), loggers=[],
                           logprob_chunk=chunk, precision=precision)
        model = load_causal_lm(cfg.policy, torch.float32).train()
        ctx = StepContext(model, tcfg, pad_token_id(tok), torch.device("cpu"), autocast=tcfg.autocast)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def train_step(ctx=ctx, opt=opt) -> None:
            loss, _ = micro_batch_loss(ctx, train_rows)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        work[f"train/{chunk}"] = train_step
        for dtype in ("bfloat16", "float32"):
            scorer = load_causal_lm(cfg.policy, getattr(torch, dtype)).eval()

            @torch.inference_mode()
            def score(scorer=scorer, chunk=chunk) -> None:
                response_logprobs(scorer, score_batch["input_ids"], score_batch["attention_mask"],
                                  score_batch["response_mask"], chunk)

            work[f"score_{dtype}/{chunk}"] = score
    times: dict[str, list[float]] = {k: [] for k in work}
    names = list(work)
    for r in range(cfg.rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order
            t0 = time.perf_counter()
            work[name]()
            times[name].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v[2:] or v) for k, v in times.items()}
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": asdict(cfg),
               "train_precision": precision, "torch": torch.__version__, "median_s": medians,
               "tokens": {"train": int(train_rows.column("response_input_ids").combine_chunks().value_lengths().to_numpy().sum()),
                          "score": int(score_batch["attention_mask"].sum())}}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(results, indent=2))
    print(f"| work | full logits (s) | chunked {LOGPROB_CHUNK} (s) | chunked / full |\n|---|---|---|---|")
    for work_name in ("train", "score_bfloat16", "score_float32"):
        full, chunked = medians[f"{work_name}/0"], medians[f"{work_name}/{LOGPROB_CHUNK}"]
        print(f"| {work_name} | {full:.4f} | {chunked:.4f} | {chunked / full:.2f} |")
    return results


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES, description=__doc__)


if __name__ == "__main__":
    main()
