"""Implicit-PRM training on Ray Train: learning, every objective, failover, reuse."""

import json
from pathlib import Path

import pytest

from prm_ray.artifacts import load_rollouts
from prm_ray.resources import Resources
from prm_ray.scoring import ImplicitPRM
from prm_ray.stages.train import TrainConfig, train_prm
from prm_ray.stages.train.examples import DatasetConfig


@pytest.fixture(scope="module")
def rollouts(tiny_train_rollouts):
    """Real rollouts of the tiny trained policy: 48 train instructions x 4 samples."""
    table = load_rollouts(tiny_train_rollouts)
    labels = table.column("correct").to_pylist()
    assert 0 < sum(labels) < len(labels), "the fixture needs both correct and incorrect responses"
    return tiny_train_rollouts


def _cfg(policy, data, out, **kw):
    base = dict(data=str(data), model=policy, out=str(out), beta=0.5, lr=3e-3, epochs=1,
                global_batch_size=16, micro_batch_size=4, workers=Resources(replicas=2, num_cpus=0.5),
                checkpoint_every=1000, warmup_ratio=0.0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ref_cache(tiny_train_ref_cache) -> str:
    """The rollouts' per-token reference log-probs, made once: trainings that read them skip their
    own reference pass (the pass itself is tested below)."""
    return str(tiny_train_ref_cache)


@pytest.fixture(scope="module")
def ce_run(tiny_trained_policy, rollouts, ref_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("prm") / "ce"
    cfg = _cfg(tiny_trained_policy[0].out, rollouts, out, epochs=6, ref_cache=ref_cache)
    return cfg, train_prm(cfg)


def test_two_workers_lower_the_loss_and_separate_correct_from_incorrect(ce_run, rollouts, tiny_trained_policy):
    cfg, report = ce_run
    history = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert report["status"] == "finished" and history[-1]["step"] == report["steps"]
    assert all(0 <= h["padding_fraction"] < 0.5 for h in history)  # micro-batches grouped by length
    first, last = history[:3], history[-3:]
    assert sum(h["loss"] for h in last) < 0.8 * sum(h["loss"] for h in first)
    # Afterwards the implicit reward separates the training responses.
    table = load_rollouts(rollouts).to_pylist()
    prm = ImplicitPRM.from_pretrained(cfg.out, ref_path=tiny_trained_policy[0].out, beta=cfg.beta)
    scores = prm.score([r["prompt"] for r in table], [r["response"] for r in table], aggregation="last_q")
    pos = [s.score for s, r in zip(scores, table) if r["correct"]]
    neg = [s.score for s, r in zip(scores, table) if not r["correct"]]
    assert sum(pos) / len(pos) > sum(neg) / len(neg)
    sign_acc = sum((s.score > 0) == r["correct"] for s, r in zip(scores, table)) / len(table)
    assert sign_acc > 0.7
    assert (Path(cfg.out) / "training_curves.png").stat().st_size > 0
    assert (Path(cfg.out) / "config.json").exists() and (Path(cfg.out) / "tokenizer.json").exists()


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of TensorBoard event files (TFRecord framing around tensorboardX's Event proto)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_a_materialized_training_set_gives_every_worker_the_rows_of_the_streamed_one(ray_session, tmp_path):
    """Read once into the object store for a second epoch, the examples still reach each of two
    workers as Ray Train's ordered split of the files hands them out, epoch after epoch."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from prm_ray.stages.train.driver import train_dataset

    for i in range(4):
        pq.write_table(pa.table({"row": list(range(10 * i, 10 * i + 10))}), tmp_path / f"part-{i:05d}.parquet")

    def rows_per_worker(materialize: bool) -> list[list[int]]:
        ds = train_dataset(str(tmp_path), materialize)
        ds.context.execution_options.preserve_order = True  # as the trainer's ingest options
        splits, got = ds.streaming_split(2, equal=True), [[], []]

        def consume(k):
            for _ in range(2):  # epochs
                for b in splits[k].iter_batches(batch_size=4, batch_format="pyarrow"):
                    got[k] += b.column("row").to_pylist()

        threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return got

    streamed = rows_per_worker(False)
    assert sorted(streamed[0][:20] + streamed[1][:20]) == list(range(40))
    assert rows_per_worker(True) == streamed


def test_every_steps_metrics_reach_tensorboard(ce_run):
    cfg, report = ce_run
    history = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    scalars = _tensorboard_scalars(Path(cfg.out) / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [h["step"] for h in history] == list(range(1, report["steps"] + 1))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert {"train/acc", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(scalars)


def test_too_few_examples_for_one_batch_is_refused_before_the_reference_pass(tiny_trained_policy, rollouts, tmp_path):
    cfg = _cfg(tiny_trained_policy[0].out, rollouts, tmp_path / "big-batch", global_batch_size=4096)
    with pytest.raises(ValueError, match="global_batch_size: 192 training examples are fewer than one global batch"):
        train_prm(cfg)
    assert not (tmp_path / "big-batch" / "examples").exists()  # the reference pass never ran


def test_finished_run_is_not_retrained(ce_run):
    cfg, report = ce_run
    again = train_prm(cfg)
    assert again["reused"] is True and again["steps"] == report["steps"]


@pytest.mark.parametrize("objective,reference", [("dpo", True), ("kto", True), ("nca", True), ("ce", False)])
def test_every_objective_trains_end_to_end(objective, reference, tiny_trained_policy, rollouts, ref_cache, tmp_path):
    cfg = _cfg(tiny_trained_policy[0].out, rollouts, tmp_path / objective, max_optimizer_steps=2, epochs=4,
               workers=Resources(replicas=1, num_cpus=1.0), dataset=DatasetConfig(objective=objective),
               use_reference=reference, ref_cache=ref_cache)
    report = train_prm(cfg)
    assert report["status"] == "finished" and report["steps"] == 2
    m = report["final_metrics"]
    assert m["loss"] == m["loss"]  # not NaN
    ImplicitPRM.from_pretrained(cfg.out, ref_path=tiny_trained_policy[0].out if reference else None)
    if objective in ("dpo", "nca"):
        assert report["dataset"]["pairs"] > 0


def test_killed_worker_resumes_from_the_last_checkpoint(tiny_trained_policy, rollouts, ref_cache, tmp_path):
    """Under FSDP2 (sharded weights and optimizer state; DDP checkpoints are exercised by every
    other run): the checkpoint holds the full state and the restarted group picks it up."""
    cfg = _cfg(tiny_trained_policy[0].out, rollouts, tmp_path / "failover", epochs=2, checkpoint_every=3,
               debug_kill_rank=1, debug_kill_at_step=8, ref_cache=ref_cache, strategy="fsdp")
    report = train_prm(cfg)
    assert report["status"] == "finished"
    starts = [a["start_step"] for a in report["attempts"]]
    assert len(starts) == 2 and starts[0] == 0
    assert starts[1] in (3, 6)  # the second attempt resumed from a checkpoint, not from scratch
    assert report["restarts"] >= 1
    history = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == report["steps"]
    assert history[-1]["loss"] < history[0]["loss"]  # the resumed run kept learning
    prm = ImplicitPRM.from_pretrained(cfg.out, ref_path=cfg.model, beta=cfg.beta)  # the full weights were saved
    assert prm.score(["3+4"], ["3+4 = 7.\n\nThe answer is 7."])[0].num_tokens > 0


def test_reference_pass_scores_each_sequence_once_and_reuses_a_cache(tiny_trained_policy, rollouts, ref_cache,
                                                                   tmp_path):
    """DPO pairs share responses: each distinct one is scored once, with the same values as a
    per-token cache of the rollouts (what a study computes once), which skips the pass entirely."""
    import pyarrow.parquet as pq

    from prm_ray.stages.evaluate import EvaluateConfig, reference_logprobs
    from prm_ray.stages.train.driver import add_reference_logprobs
    from prm_ray.stages.train.examples import build_examples

    policy = tiny_trained_policy[0].out
    cfg = _cfg(policy, rollouts, tmp_path / "x", dataset=DatasetConfig(objective="dpo"))
    examples, report = build_examples(cfg.data, cfg.dataset)
    assert report["pairs"] > 0
    path, _, counts = add_reference_logprobs(examples, cfg, tmp_path / "fresh")
    distinct = {(p, r) for p, c, j in zip(*(examples.column(k).to_pylist() for k in ("prompt", "chosen", "rejected")))
                for r in (c, j)}
    assert counts == {"distinct_sequences": len(distinct), "from_cache": 0, "scored": len(distinct)}
    fresh = pq.read_table(path)
    assert fresh.column("chosen").to_pylist() == examples.column("chosen").to_pylist()  # order kept

    cfg.ref_cache = ref_cache  # reference_logprobs of the rollouts in the training's dtype (the fixture)
    path, _, counts = add_reference_logprobs(examples, cfg, tmp_path / "cached")
    assert counts["from_cache"] == len(distinct) and counts["scored"] == 0
    cached = pq.read_table(path)
    for col in ("ref_logp_chosen", "ref_logp_rejected"):
        assert cached.column(col).to_pylist() == pytest.approx(fresh.column(col).to_pylist(), abs=1e-4)

    cfg.reference_model = str(tmp_path / "another-model")
    with pytest.raises(ValueError, match="ref_cache"):
        add_reference_logprobs(examples, cfg, tmp_path / "wrong")

    # A cache in another dtype than the one this training's reference pass resolves to would
    # train on other numbers: refused.
    cfg.reference_model = None
    other = "float32" if cfg.ref_pass.resolved().dtype == "bfloat16" else "bfloat16"
    reference_logprobs(rollouts, policy, tmp_path / other, EvaluateConfig(dtype=other))
    cfg.ref_cache = str(tmp_path / other)
    with pytest.raises(ValueError, match=f"ref_cache: .* {other}"):
        add_reference_logprobs(examples, cfg, tmp_path / "other-dtype-run")


def test_relative_local_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray Train workers run elsewhere: `--model artifacts/policy` must not become a hub lookup."""
    from prm_ray.stages.train.config import absolute_paths as _absolute_paths

    (tmp_path / "policy").mkdir()
    (tmp_path / "rollouts").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = _absolute_paths(TrainConfig(data="rollouts", model="policy",
                                      reference_model="meta-llama/Llama-3.1-8B-Instruct", out="runs/prm"))
    assert cfg.data == str(tmp_path / "rollouts") and cfg.model == str(tmp_path / "policy")
    assert cfg.out == str(tmp_path / "runs" / "prm")
    assert cfg.reference_model == "meta-llama/Llama-3.1-8B-Instruct"  # a hub id stays a hub id


def test_explicit_prm_learns_step_labels_and_scores_through_the_evaluation_pass(
        tiny_trained_policy, rollouts, tmp_path):
    """The Math-Shepherd baseline's PRM: the same loop with a step-label objective; evaluation's Ray
    Data pass gives the in-process ExplicitPRM scores."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from prm_ray.scoring import ExplicitPRM, load_prm
    from prm_ray.stages.evaluate import EvaluateConfig, evaluate_prm
    from prm_ray.tokens import encode_pair

    policy = tiny_trained_policy[0].out
    tok = AutoTokenizer.from_pretrained(policy)
    table = load_rollouts(rollouts)
    rows = table.to_pylist()
    # Step labels a PRM can learn from the text: every step of a correct response is good; an
    # incorrect one is good up to its last step (as Math-Shepherd's hard labels often are).
    hard = []
    for r in rows:
        n = len(encode_pair(tok, r["prompt"], r["response"]).steps)
        hard.append([1.0] * n if r["correct"] else [1.0] * (n - 1) + [0.0])
    labelled = tmp_path / "labels" / "data"
    labelled.mkdir(parents=True)
    pq.write_table(table.append_column("step_labels_hard", pa.array(hard, pa.list_(pa.float32())))
                   .append_column("step_labels_soft", pa.array(hard, pa.list_(pa.float32()))),
                   labelled / "shard-000000.parquet")
    cfg = _cfg(policy, labelled.parent, tmp_path / "ms", epochs=6, lr=3e-3,
               dataset=DatasetConfig(objective="math-shepherd-hard"))
    report = train_prm(cfg)
    assert report["status"] == "finished" and report["reference_pass"]["distinct_sequences"] == 0
    history = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert sum(h["loss"] for h in history[-3:]) < 0.8 * sum(h["loss"] for h in history[:3])
    card = json.loads((Path(cfg.out) / "prm_ray_prm.json").read_text())
    assert card["kind"] == "explicit" and card["reference_model"] is None

    prm = load_prm(cfg.out)
    assert isinstance(prm, ExplicitPRM)
    want = prm.score([r["prompt"] for r in rows], [r["response"] for r in rows], batch_size=7)
    pos = [w.score for w, r in zip(want, rows) if r["correct"]]
    neg = [w.score for w, r in zip(want, rows) if not r["correct"]]
    assert sum(pos) / len(pos) > sum(neg) / len(neg)  # min step probability ranks correct ones higher
    assert all(0 < p < 1 for w in want for p in w.step_rewards)
    with pytest.raises(Exception, match="eval.use_reference"):
        evaluate_prm(cfg.out, rollouts, tmp_path / "eval-ref", EvaluateConfig(replicas=1))
    with pytest.raises(Exception, match="eval.backend vllm scores implicit PRMs"):
        evaluate_prm(cfg.out, rollouts, tmp_path / "eval-vllm", EvaluateConfig(replicas=1, backend="vllm"))
    ecfg = EvaluateConfig(use_reference=False, replicas=1, batch_size=32, micro_batch_size=5, dtype="float32")
    evaluate_prm(cfg.out, rollouts, tmp_path / "eval", ecfg)
    got = {(r["instruction_id"], r["sample_index"]): r for r in pq.read_table(tmp_path / "eval" / "scores").to_pylist()}
    for w, r in zip(want, rows):
        g = got[(r["instruction_id"], r["sample_index"])]
        assert g["score_min"] == pytest.approx(w.score, abs=1e-5)
        assert g["step_rewards"] == pytest.approx(w.step_rewards, abs=1e-5)
