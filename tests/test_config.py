"""Typed configs: YAML + CLI, errors that name the field, resolved config round trip."""

import pytest
import yaml

from prm_ray.cli import parse_args
from prm_ray.config import ConfigError, from_dict, save_config, to_dict
from prm_ray.policy.bootstrap import BootstrapConfig


def test_cli_overrides_yaml_and_nested_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 10, "arith": {"max_steps": 4}, "eval": {"temperature": 0.7}}))
    cfg = parse_args(BootstrapConfig, ["--config", str(path), "--steps", "20", "--arith.modulus", "null",
                                       "--overwrite", "--bf16", "false"])
    assert cfg.steps == 20 and cfg.arith.max_steps == 4 and cfg.arith.modulus is None
    assert cfg.eval.temperature == 0.7 and cfg.overwrite is True and cfg.bf16 is False


def test_resolved_config_round_trips(tmp_path):
    cfg = from_dict(BootstrapConfig, {"lr": 1e-3, "arith": {"ops": "+-"}})
    path = save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(BootstrapConfig, yaml.safe_load(path.read_text()))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "data, needle",
    [({"stpes": 3}, "stpes"), ({"steps": "many"}, "steps"), ({"arith": {"max_step": 3}}, "arith.max_step"),
     ({"arith": {"min_steps": 5, "max_steps": 2}}, "min_steps"), ({"bf16": "maybe"}, "bf16"),
     ({"steps": 2.5}, "steps"), ({"arith": 3}, "arith")],
)
def test_bad_values_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(BootstrapConfig, data)


def test_cli_error_exits_with_message(capsys):
    with pytest.raises(SystemExit):
        parse_args(BootstrapConfig, ["--steps", "lots"])
    assert "steps" in capsys.readouterr().err
