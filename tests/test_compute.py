"""FLOPs accounting: the formulas on a model whose parameter count is known by hand."""

from transformers import LlamaForCausalLM

from prm_ray.core.flops import forward_flops, stage, total_flops, train_flops
from prm_ray.models import count_parameters
from prm_ray.policy import ModelShape, build_char_tokenizer
from prm_ray.stages.runtime import measure
from prm_ray.tokens import prompt_token_counts


def test_parameter_count_and_flops_of_a_known_llama(tmp_path):
    shape = ModelShape(hidden_size=64, num_layers=3, num_heads=2, intermediate_size=96, max_position_embeddings=128)
    config = shape.to_config()
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    h, f, v, n = 64, 96, config.vocab_size, 3
    # tied embedding/LM head + per layer (q, k, v, o; gate, up, down; two RMSNorms) + the final norm
    by_hand = v * h + n * (4 * h * h + 3 * h * f + 2 * h) + h
    assert count_parameters(str(tmp_path)) == by_hand == LlamaForCausalLM(config).num_parameters()
    assert forward_flops(by_hand, 1000) == 2 * by_hand * 1000
    assert train_flops(by_hand, 1000) == 6 * by_hand * 1000 == 3 * forward_flops(by_hand, 1000)
    stages = {"a": stage(forward_flops(by_hand, 10), tokens=10), "b": stage(train_flops(by_hand, 5), wall_s=1.0)}
    assert total_flops(stages) == 2 * by_hand * 10 + 6 * by_hand * 5
    assert stages["a"]["wall_s"] is None and stages["b"]["wall_s"] == 1.0 and stages["a"]["tokens"] == 10


def test_prompt_tokens_are_counted_as_the_policy_sees_them():
    tok = build_char_tokenizer()
    # "<s>" + "Q: " + text + "\n": one token per character plus BOS (the chat template)
    assert prompt_token_counts(tok, ["1+1", "12+3", "1+1"]) == [1 + 3 + 3 + 1, 1 + 3 + 4 + 1, 1 + 3 + 3 + 1]


def test_measure_counts_the_cpu_time_of_niced_worker_processes():
    """Ray's workers run niced; their CPU time must count (the kernel books it as `nice`)."""
    import subprocess
    import sys

    burn = "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"
    with measure() as m:
        subprocess.run(["nice", "-n", "10", sys.executable, "-c", burn], check=True)
    assert m["wall_s"] >= 1.0 and m["cpu_s"] >= 0.8  # the child's second of busy CPU
