"""Tokenize once: the Arrow token columns equal per-row encoding, and the training step on them
computes today's losses (fp32, 1e-5) for every objective."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prm_ray.core.losses import kto_reference_point
from prm_ray.core.objectives import get_objective
from prm_ray.core.reward import response_logprobs, sequence_reward, step_label_logits
from prm_ray.models import load_causal_lm, load_tokenizer
from prm_ray.resources import Resources
from prm_ray.stages.logprobs import ModelPass
from prm_ray.stages.tokenize import read_tokens, tokenize_dataset
from prm_ray.stages.train.config import TrainConfig
from prm_ray.stages.train.examples import DatasetConfig, attach_tokens, build_examples, tokenize_examples
from prm_ray.stages.train.step import StepContext, micro_batch_loss, micro_batches
from prm_ray.tasks.arith import ArithTask
from prm_ray.tokens import (
    collate_items,
    collate_tokens,
    encode_pair,
    encode_table,
    pad_token_id,
    splice_prompts,
    step_label_token_ids,
)

POLICY = str(Path(__file__).resolve().parents[1] / "artifacts" / "policy")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(POLICY)


@pytest.fixture(scope="module")
def rollouts() -> pa.Table:
    """Per instruction: its solution (correct), a copy with one wrong result, and odd texts."""
    rows = []
    for n, inst in enumerate(ArithTask().instructions("train", limit=12)):
        sol = inst.meta["solution"]
        steps = sol.split("\n\n")
        head, _, val = steps[0].rpartition("= ")
        wrong = "\n\n".join([f"{head}= {(int(val) + 1) % 10}"] + steps[1:])
        odd = ["", "\n\nThe answer is 3\n\n\n\n", "no steps at all"][n % 3]
        for j, (resp, ok) in enumerate([(sol, True), (wrong, False), (odd, False)]):
            rows.append({"instruction_id": inst.id, "prompt": inst.prompt, "response": resp, "sample_index": j,
                         "correct": ok, "verify_status": "ok" if resp else "no_answer"})
    return pa.Table.from_pylist(rows)


def test_token_columns_equal_per_row_encoding_and_padding(tok, rollouts):
    prompts, responses = rollouts.column("prompt").to_pylist(), rollouts.column("response").to_pylist()
    table = encode_table(tok, prompts, responses)
    items = [encode_pair(tok, p, r) for p, r in zip(prompts, responses)]
    assert table.column("input_ids").to_pylist() == [it.input_ids for it in items]
    assert table.column("prompt_len").to_pylist() == [it.prompt_len for it in items]
    assert table.column("step_ids").to_pylist() == [it.step_ids for it in items]
    assert table.column("num_steps").to_pylist() == [len(it.steps) for it in items]
    pad = pad_token_id(tok)
    chunked = pa.concat_tables([table.slice(0, 5), table.slice(5)])  # as Ray Data hands batches over
    for got, want in ((collate_tokens(table.slice(3, 9), pad), items[3:12]), (collate_tokens(chunked, pad), items)):
        expected = collate_items(want, pad)
        for k, v in expected.items():
            assert torch.equal(got[k], v), k


def test_spliced_prompts_equal_encoding_the_mismatched_pair(tok, rollouts):
    prompts, responses = rollouts.column("prompt").to_pylist(), rollouts.column("response").to_pylist()
    table = encode_table(tok, prompts, responses)
    other = list(range(len(prompts)))[::-1]  # row i gets row n-1-i's response (another instruction)
    got = splice_prompts(table, table.take(other))
    want = encode_table(tok, prompts, [responses[j] for j in other])
    assert got.to_pylist() == want.to_pylist()


@pytest.mark.parametrize("objective", ["ce", "kto", "dpo", "nca"])
def test_attached_tokens_equal_in_process_tokenization(tok, rollouts, objective):
    examples, _ = build_examples(rollouts, DatasetConfig(objective=objective))
    tokens = pa.Table.from_arrays(
        [rollouts.column("instruction_id"), rollouts.column("sample_index")]
        + encode_table(tok, rollouts.column("prompt").to_pylist(), rollouts.column("response").to_pylist()).columns,
        names=["instruction_id", "sample_index", "input_ids", "prompt_len", "step_ids", "num_steps"])
    shuffled = tokens.take(list(range(tokens.num_rows))[::-1])  # the join is by key, not by order
    assert attach_tokens(examples, shuffled).to_pylist() == tokenize_examples(examples, tok).to_pylist()
    with pytest.raises(ValueError, match="max_position_embeddings 20"):
        attach_tokens(examples, tokens, max_length=20)
    with pytest.raises(ValueError, match="no row for instruction"):
        attach_tokens(examples, tokens.slice(1))


def _reference_loss(model, tok, cfg: TrainConfig, rows: dict) -> torch.Tensor:
    """The step as it was before tokenize-once: encode_pair per row inside the step."""
    pad = pad_token_id(tok)
    objective = get_objective(cfg.dataset.objective)

    def logp(prompts, responses):
        t = collate_items([encode_pair(tok, p, r) for p, r in zip(prompts, responses)], pad)
        return response_logprobs(model, t["input_ids"], t["attention_mask"], t["response_mask"]).sum(-1).float()

    def f(col):
        return torch.tensor(rows[col], dtype=torch.float32)

    if objective.explicit:
        items = [encode_pair(tok, p, r) for p, r in zip(rows["prompt"], rows["response"])]
        t = collate_items(items, pad)
        num_steps = max(len(it.steps) for it in items)
        labels = torch.zeros(len(items), num_steps)
        for b, row in enumerate(rows["step_labels"]):
            labels[b, : len(row)] = torch.tensor(row)
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        z, mask = step_label_logits(logits.float(), t["step_ids"], *step_label_token_ids(tok, cfg.step_label_tokens),
                                    num_steps)
        return objective.loss(z, labels, mask)
    if objective.paired:
        n = len(rows["chosen"])
        lp = logp(rows["prompt"] * 2, rows["chosen"] + rows["rejected"])
        return objective.loss(sequence_reward(lp[:n], f("ref_logp_chosen"), cfg.beta),
                              sequence_reward(lp[n:], f("ref_logp_rejected"), cfg.beta))
    r = sequence_reward(logp(rows["prompt"], rows["response"]), f("ref_logp"), cfg.beta)
    if objective.needs_reference_point:
        with torch.no_grad():
            kl = sequence_reward(logp(rows["prompt"], rows["kl_response"]), f("ref_logp_kl"), cfg.beta)
        return objective.loss(r, f("label"), kto_reference_point(kl.mean().reshape(1)))
    return objective.loss(r, f("label"))


@pytest.mark.parametrize("objective", ["ce", "kto", "dpo", "nca", "math-shepherd-hard"])
def test_training_step_on_token_columns_computes_the_same_loss(tok, rollouts, objective):
    torch.manual_seed(0)
    model = load_causal_lm(POLICY, torch.float32)
    data = rollouts
    if get_objective(objective).explicit:  # a label per step of each response, as Math-Shepherd gives
        steps = encode_table(tok, rollouts.column("prompt").to_pylist(), rollouts.column("response").to_pylist())
        data = rollouts.append_column("step_labels_hard", pa.array(
            [[float((i + s) % 2) for s in range(n)] for i, n in enumerate(steps.column("num_steps").to_pylist())],
            pa.list_(pa.float32())))
    examples, _ = build_examples(data, DatasetConfig(objective=objective))
    for col in get_objective(objective).reference_columns:  # some reference log-probs
        examples = examples.append_column(col[1], pa.array([-3.0 - i for i in range(examples.num_rows)], pa.float64()))
    examples = tokenize_examples(examples.slice(0, 8), tok)
    cfg = TrainConfig(dataset=DatasetConfig(objective=objective), beta=0.3, micro_batch_size=8, global_batch_size=8,
                      workers=Resources(replicas=1))
    ctx = StepContext(model, cfg, pad_token_id(tok), torch.device("cpu"), autocast=False,
                      label_token_ids=step_label_token_ids(tok, cfg.step_label_tokens) if cfg.explicit else None)
    loss, stats = micro_batch_loss(ctx, examples)
    want = _reference_loss(model, tok, cfg, examples.to_pydict())
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert stats["tokens"] > 0


def test_model_pass_reads_token_columns_as_it_reads_text(tok, rollouts):
    """The reference pass and evaluation read a tokenized dataset: the same numbers, the same output columns."""
    tokens = encode_table(tok, rollouts.column("prompt").to_pylist(), rollouts.column("response").to_pylist())
    tokenized = rollouts
    for name in tokens.column_names:
        tokenized = tokenized.append_column(name, tokens.column(name))
    for output, col in (("token_logp", "ref_token_logp"), ("sequence_logp", "ref_logp")):
        mp = ModelPass(POLICY, output, dtype="float32", micro_batch_size=5)
        text, toks = mp(rollouts), mp(tokenized)
        assert toks.column_names == text.column_names == rollouts.column_names + [col]
        assert toks.column(col).to_pylist() == text.column(col).to_pylist()
    mp.max_length = 20
    with pytest.raises(ValueError, match="instruction .* sample 0 is too long: .* > max_position_embeddings 20"):
        mp(tokenized)


def test_micro_batches_grouped_by_length_keep_the_step_rows_and_pad_less(tok, rollouts):
    examples, _ = build_examples(rollouts, DatasetConfig(objective="ce"))
    rows = tokenize_examples(examples, tok).slice(0, 16)

    def keys(tables):
        return sorted((r["instruction_id"], r["sample_index"]) for t in tables for r in t.to_pylist())

    def padded(tables):
        return sum(t.num_rows * max(len(x) for x in t.column("response_input_ids").to_pylist()) for t in tables)

    plain, grouped = micro_batches(rows, 4, False), micro_batches(rows, 4, True)
    assert [t.to_pylist() for t in plain] == [rows.slice(i, 4).to_pylist() for i in range(0, 16, 4)]
    assert [t.num_rows for t in grouped] == [4] * 4 and keys(grouped) == keys(plain)
    assert padded(grouped) < padded(plain)
    lengths = [len(x) for t in grouped for x in t.column("response_input_ids").to_pylist()]
    assert lengths == sorted(lengths, reverse=True)


def test_the_ray_data_token_pass_equals_the_in_process_one_and_is_reused(tok, rollouts, ray_session, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "data").mkdir(parents=True)
        for i in range(0, rollouts.num_rows, 10):  # shard files, as a rollout job writes them
            pq.write_table(rollouts.slice(i, 10), tmp_path / name / "data" / f"shard-{i:06d}.parquet")
    by_ray, info = tokenize_dataset(tmp_path / "a", POLICY, in_process_rows=0)
    here, _ = tokenize_dataset(tmp_path / "b", POLICY)
    assert not info["reused"] and tokenize_dataset(tmp_path / "a", POLICY, in_process_rows=0)[1]["reused"]

    def rows(path):
        t = pq.read_table(path / "data")
        assert set(t.column_names) == set(rollouts.column_names) | {"input_ids", "prompt_len", "step_ids", "num_steps"}
        return sorted(t.to_pylist(), key=lambda r: (r["instruction_id"], r["sample_index"]))

    assert rows(by_ray) == rows(here)
    assert read_tokens(here).num_rows == rollouts.num_rows
    with pytest.raises(FileNotFoundError, match="no dataset"):
        tokenize_dataset(tmp_path / "missing", POLICY)


def test_the_release_split_scores_the_released_eval_s_steps(tok, tmp_path):
    """step_split release: "Step N:" markers, pieces stripped, renumbered and joined by blank lines;
    each step ends with its separator and the last holds the EOS token."""
    from prm_ray.core.reward import release_steps, steps_to_score

    response = "Let me see. Step 1: 1+2 = 3\nStep 3: 3*2 = 6, Step-wise\n\nStep 2:\n The answer is \\boxed{6}"
    assert release_steps(response) == ["Step 1: Let me see.", "Step 2: 1+2 = 3", "Step 3: 3*2 = 6, step-wise",
                                       "Step 4: The answer is \\boxed{6}"]
    text, starts = steps_to_score(response, "release")
    assert text == "\n\n".join(release_steps(response)) and [text[s:s + 7] for s in starts] == ["Step 1:", "Step 2:",
                                                                                                "Step 3:", "Step 4:"]
    assert steps_to_score("no markers\n\nat all", "release")[0] == "Step 1: no markers\n\nat all"
    assert steps_to_score("", "release") == ("", None) and steps_to_score(" \n", "release") == ("", None)
    with pytest.raises(ValueError, match="step_split"):
        steps_to_score("x", "sentences")
    item = encode_pair(tok, "1+2", response, step_split="release")
    assert item.steps == [s + "\n\n" for s in release_steps(response)[:-1]] + [release_steps(response)[-1]]
    assert item.step_ids[-1] == 3 and item.input_ids[-1] == tok.eos_token_id  # EOS closes the last step
    # "no markers": one step even though it has a blank line (the blank_line split makes two)
    assert len(encode_pair(tok, "1", "no markers\n\nat all", step_split="release").steps) == 1
    assert len(encode_pair(tok, "1", "no markers\n\nat all").steps) == 2
    # The token cache of the release split is its own, and equals per-row encoding.
    (tmp_path / "d" / "data").mkdir(parents=True)
    rows = [{"instruction_id": "i", "sample_index": j, "prompt": "1+2", "response": r}
            for j, r in enumerate([response, "no markers\n\nat all", ""])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d" / "data" / "shard-000000.parquet")
    plain, _ = tokenize_dataset(tmp_path / "d", POLICY)
    release, _ = tokenize_dataset(tmp_path / "d", POLICY, step_split="release")
    assert plain != release
    got = pq.read_table(release / "data").to_pylist()
    for r in got:
        want = encode_pair(tok, r["prompt"], r["response"], step_split="release")
        assert (r["input_ids"], r["step_ids"], r["num_steps"]) == (want.input_ids, want.step_ids, len(want.steps))
