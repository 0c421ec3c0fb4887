"""bench/gpu_bench.py: its quick mode runs on CPU, prm-ray's path and the plain one compute the
same numbers, and it imports without Ray or vLLM (a bare GPU node has neither)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

# What a GPU node without Ray and vLLM sees: importing either fails.
NO_RAY = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("ray", "vllm"):
            raise ImportError(f"{name} is not installed on this node")
sys.meta_path.insert(0, Block())
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
import gpu_bench
import prm_ray.stages.train.step, prm_ray.scoring
print("ok")
"""


def test_quick_run_on_cpu_gives_the_same_numbers_by_both_paths(tmp_path):
    import gpu_bench

    r = gpu_bench.main(["--quick", "--out", str(tmp_path / "gpu_bench.json")])
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["shapes"].keys() == {"tiny"}
    tiny = r["shapes"]["tiny"]
    loss = tiny["train"]["first_loss"]
    assert set(loss) == {"ddp", "fsdp", "plain"}  # quick mode leaves out compiling
    for variant in ("ddp", "fsdp"):  # the chunked head, under DDP and FSDP2, against the plain step
        assert loss[variant] == pytest.approx(loss["plain"], abs=1e-5)
        assert tiny["train"][variant]["tokens_per_s"] > 0 and tiny["train"][variant]["flops_per_s"] > 0
        assert tiny["train"][variant]["mfu"] is None  # no known peak on a CPU
    assert tiny["score"]["outcome_reward_max_abs_diff"] < 1e-5
    for path in ("project", "plain"):
        assert tiny["score"][path]["responses_per_s"] > 0 and tiny["score"][path]["flops_per_s"] > 0
    assert not torch.distributed.is_initialized()  # the bench's one-process group is gone


def test_bench_and_the_training_step_import_without_ray_or_vllm():
    out = subprocess.run([sys.executable, "-c", NO_RAY, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
