"""Precision `auto`: bf16 only where the hardware computes it natively, resolved once per run."""

import pytest

from prm_ray.config import ConfigError
from prm_ray.resources import cpu_has_native_bf16, resolve_dtype
from prm_ray.serve.config import ServeConfig, resolved_config
from prm_ray.stages.evaluate import EvaluateConfig
from prm_ray.stages.logprobs import LogprobPassConfig
from prm_ray.stages.train.config import TrainConfig


def test_explicit_dtypes_pass_through_and_gpus_get_bf16():
    assert resolve_dtype("float32", 1) == "float32" and resolve_dtype("bfloat16", 0) == "bfloat16"
    assert resolve_dtype("auto", 1) == "bfloat16"
    assert resolve_dtype("auto", 0) == ("bfloat16" if cpu_has_native_bf16() else "float32")


def test_a_cpu_without_native_bf16_resolves_auto_to_float32(monkeypatch):
    # oneDNN capped at AVX2 emulates bf16 (docs/bench_precision.md): what an AVX2-only CPU does.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_native_bf16()
    cfg = TrainConfig().resolved()
    assert cfg.precision == "float32" and cfg.ref_pass.dtype == "float32" and not cfg.autocast
    assert EvaluateConfig().resolved().dtype == "float32"
    assert resolved_config(ServeConfig(prm="x")).dtype == "float32"
    assert resolve_dtype("auto", 0.5) == "bfloat16"  # any GPU share: CUDA computes bf16 natively


def test_resolved_configs_name_a_concrete_dtype_and_keep_explicit_ones():
    for cfg in (TrainConfig().resolved(), TrainConfig(precision="float32").resolved()):
        assert cfg.precision in ("bfloat16", "float32") and cfg.ref_pass.dtype in ("bfloat16", "float32")
    assert TrainConfig(precision="float32").resolved().precision == "float32"
    assert LogprobPassConfig(dtype="float64").resolved().dtype == "float64"
    assert EvaluateConfig(dtype="bfloat16").resolved().use_reference is True  # the rest is kept


@pytest.mark.parametrize("make, needle", [
    (lambda: TrainConfig(precision="fp16"), "precision"),
    (lambda: TrainConfig(precision="float64"), "precision"),
    (lambda: LogprobPassConfig(dtype="half"), "dtype"),
    (lambda: EvaluateConfig(dtype="bf16"), "eval.dtype"),
    (lambda: ServeConfig(prm="x", dtype="int8"), "dtype"),
])
def test_bad_precisions_name_the_field(make, needle):
    with pytest.raises(ConfigError, match=needle):
        make()


def test_precision_bench_quick_mode_resolves_auto_per_cpu_mode(tmp_path):
    """bench/precision_bench.py runs both CPU modes; capped to AVX2, `auto` is float32 (no timing asserted)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import precision_bench

    r = precision_bench.main(["--quick", "--reps", "1", "--out", str(tmp_path / "p.json")])
    native, avx2 = r["modes"]["native"], r["modes"]["avx2"]
    assert native["auto"] == resolve_dtype("auto", 0)
    assert avx2["auto"] == "float32" and not avx2["native_bf16"] and avx2["onednn_max_cpu_isa"] == "AVX2"
    for mode in (native, avx2):
        for key in ("train_step_s", "reference_pass_s", "matmul_gflops"):
            assert mode[key].keys() == {"float32", "bfloat16"} and min(mode[key].values()) > 0


def test_a_rollout_set_is_keyed_by_the_precision_auto_samples_in(monkeypatch, tmp_path):
    """A study's rollout directory (and its Math-Shepherd completions') names the dtype `auto`
    resolves to on this machine, so a CPU with native bf16 does not reuse responses sampled in fp32."""
    import prm_ray.resources as resources
    from prm_ray.stages.rollout import RolloutConfig
    from prm_ray.stages.shepherd import ShepherdConfig
    from prm_ray.study import StudyConfig
    from prm_ray.study.specs import rollout_dir, sampling_key

    cfg = StudyConfig(runs_dir=str(tmp_path))
    auto, fp32, bf16 = RolloutConfig(), RolloutConfig(), RolloutConfig()
    fp32.engine.dtype, bf16.engine.dtype = "float32", "bfloat16"
    monkeypatch.setattr(resources, "cpu_has_native_bf16", lambda: False)
    assert rollout_dir(cfg, auto) == rollout_dir(cfg, fp32) != rollout_dir(cfg, bf16)
    assert sampling_key(ShepherdConfig())["engine"]["dtype"] == "float32"
    monkeypatch.setattr(resources, "cpu_has_native_bf16", lambda: True)
    assert rollout_dir(cfg, auto) == rollout_dir(cfg, bf16) != rollout_dir(cfg, fp32)
    assert sampling_key(ShepherdConfig())["engine"]["dtype"] == "bfloat16"
    assert auto.engine.dtype == "auto"  # the key resolves; the config itself is left as written
