"""Spreading the model over workers (stages.train.parallel) and the chunked LM head: the same
training as one plain process, and checkpoints that hold the full state."""

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from prm_ray.core.reward import ResponseLogprobs, response_logprobs
from prm_ray.stages.train.parallel import blocks, full_state, gradient_sync, load_optimizer_state, parallelize

WORLD, ROWS, STEPS, MICRO = 2, 16, 2, 2  # 2 steps of 8 rows: 2 workers x 2 micro-batches of 2 rows


def _lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64)).float()


def _data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 48, (ROWS, 14), generator=g)
    attn = torch.ones_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ROWS):  # prompts of 3-5 tokens, responses ending at 10-14
        end = 10 + b % 5
        attn[b, end:] = 0
        mask[b, 3 + b % 3 : end] = True
    return ids, attn, mask


def _optimizer(model):
    # SGD with momentum: it has state to checkpoint, and unlike Adam its step scales with the
    # gradient, so a sum where a mean belongs would show.
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _loss(model, ids, attn, mask):
    return (model(ids, attn, mask).sum(-1) ** 2).mean() / 100


def _train(model, opt, rows, accum, sync=lambda enabled: gradient_sync(torch.nn.Module(), enabled)):
    ids, attn, mask = _data()
    for step in range(STEPS):
        opt.zero_grad()
        for k in range(accum):
            r = rows(step, k)
            with sync(k == accum - 1):
                (_loss(model, ids[r], attn[r], mask[r]) / accum).backward()
        opt.step()


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        lm = _lm()
        model = parallelize(ResponseLogprobs(lm, chunk_size=5), "fsdp", torch.device("cpu"), bf16=False,
                            compile=False)
        opt = _optimizer(model)
        per_worker = ROWS // STEPS // WORLD  # this worker's rows of one step, in micro-batches of MICRO
        _train(model, opt, lambda s, k: slice(s * ROWS // STEPS + rank * per_worker + k * MICRO,
                                              s * ROWS // STEPS + rank * per_worker + (k + 1) * MICRO),
               per_worker // MICRO, sync=lambda enabled: gradient_sync(model, enabled))
        weights, opt_state = full_state(model, opt)
        # A fresh sharded model restores the optimizer state and takes the same next step.
        lm2 = _lm(seed=5)
        lm2.load_state_dict(_broadcast(weights))
        model2 = parallelize(ResponseLogprobs(lm2), "fsdp", torch.device("cpu"), bf16=False, compile=False)
        opt2 = _optimizer(model2)
        load_optimizer_state(model2, opt2, _broadcast(opt_state))
        ids, attn, mask = _data()
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            _loss(m, ids, attn, mask).backward()
            o.step()
        after = full_state(model, opt)[0], full_state(model2, opt2)[0]
        # precision bfloat16: blocks compute in bf16 while the sharded weights stay float32.
        model3 = parallelize(ResponseLogprobs(_lm()), "fsdp", torch.device("cpu"), bf16=True, compile=False)
        weights3 = {p.dtype for p in model3.parameters()}  # the shards, what the optimizer updates
        seen = []
        model3.lm.model.layers[0].register_forward_hook(lambda mod, args, output: seen.append(output.dtype))
        logp = model3(ids, attn, mask)
        dtypes = {"compute": seen[0], "weights": weights3, "logp": logp.dtype}
        if rank == 0:
            torch.save({"weights": weights, "next": after, "bf16": dtypes}, out)
    finally:
        dist.destroy_process_group()


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_result(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp") / "result.pt")
    mp.spawn(_fsdp_worker, args=(_free_port(), out), nprocs=WORLD)
    return torch.load(out, weights_only=False)


def test_fsdp_over_two_workers_trains_like_one_process(fsdp_result):
    """FSDP2 in float32, sharded over 2 gloo workers with gradient accumulation, gives the weights
    of one process training on every row of each step (the gradients' mean is the same)."""
    lm = _lm()
    model = ResponseLogprobs(lm, chunk_size=0)  # the unchunked head, the model's own logits
    opt = _optimizer(model)
    _train(model, opt, lambda s, k: slice(s * ROWS // STEPS, (s + 1) * ROWS // STEPS), 1)
    got = fsdp_result["weights"]
    assert set(got) == set(lm.state_dict())  # save_pretrained's keys, unsharded
    for name, want in lm.state_dict().items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_checkpoint_restores_the_optimizer(fsdp_result):
    trained, restored = fsdp_result["next"]
    for name in trained:
        torch.testing.assert_close(restored[name], trained[name], rtol=0, atol=1e-6, msg=name)


def test_fsdp_bf16_computes_in_bf16_over_float32_master_weights(fsdp_result):
    assert fsdp_result["bf16"] == {"compute": torch.bfloat16, "weights": {torch.float32}, "logp": torch.float32}


def test_compiled_blocks_give_the_same_loss_and_gradients():
    ids, attn, mask = _data()
    grads = []
    for compile in (False, True):
        lm = _lm()
        model = parallelize(ResponseLogprobs(lm, chunk_size=5), "ddp", torch.device("cpu"), bf16=False,
                            compile=compile)
        _loss(model, ids, attn, mask).backward()
        grads.append([p.grad for p in lm.parameters()])
    assert all(type(b).__name__ == "OptimizedModule" or b._compiled_call_impl is not None for b in blocks(lm))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_blocks_are_the_models_transformer_layers():
    lm = _lm()
    assert blocks(lm) == list(lm.model.layers)


def test_chunked_lm_head_gives_the_same_logprobs_and_gradients():
    """The chunked head (never the whole [tokens, vocab] logits; backward recomputes each chunk)
    against the model's own logits: equal values and gradients in float32."""
    ids, attn, mask = _data()
    results = {}
    for chunk in (0, 3, 1024):
        lm = _lm()
        lp = response_logprobs(lm, ids, attn, mask, chunk_size=chunk)
        (lp.sum(-1) ** 2).mean().backward()
        results[chunk] = lp.detach(), {n: p.grad for n, p in lm.named_parameters()}
    for chunk in (3, 1024):
        torch.testing.assert_close(results[chunk][0], results[0][0], rtol=0, atol=1e-5)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(results[chunk][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_logprob_chunk_bench_quick_run(tmp_path):
    """bench/logprob_chunk.py times every setting (no speed asserted: the machine is shared)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import logprob_chunk

    r = logprob_chunk.main(["--quick", "--out", str(tmp_path / "lc.json")])
    assert set(r["median_s"]) == {f"{w}/{c}" for w in ("train", "score_bfloat16", "score_float32")
                                  for c in logprob_chunk.CHUNKS}
    assert all(v > 0 for v in r["median_s"].values()) and r["tokens"]["train"] > 0
