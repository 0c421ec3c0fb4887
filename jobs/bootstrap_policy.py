"""Train the embedded default policy (a small Llama, from scratch, on the arith world) and measure it.

    python jobs/bootstrap_policy.py --out artifacts/policy            # default config, seed 0
    python jobs/bootstrap_policy.py --config my.yaml --steps 500 --overwrite

Writes a Hugging Face model directory (config, safetensors, tokenizer, chat template) that
transformers and vLLM load with `from_pretrained(path)`, plus `prm_ray_policy.json` (the policy
card: rollout temperature, accuracy on held-out problems, training time) and the resolved config.
"""

import json

from prm_ray.cli import run_job
from prm_ray.policy.bootstrap import BootstrapConfig, bootstrap

CONFIG, ALIASES = BootstrapConfig, {}


def run(cfg: BootstrapConfig) -> dict:
    card = bootstrap(cfg)
    m = card["metrics"]
    k = m["samples"]
    print(json.dumps({key: m[key] for key in ("pass@1", f"pass@{k}", f"majority@{k}", f"likelihood_bon@{k}")}, indent=2))
    print(f"policy in {cfg.out} ({'reused' if card['reused'] else 'trained'}; "
          f"temperature {card['rollout_temperature']}, {card['train']['train_seconds']:.0f} s training)")
    return card


def main(argv=None) -> dict:
    return run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
