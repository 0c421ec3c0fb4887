"""Serve an implicit PRM over HTTP: POST /score, POST /rerank, GET /health (docs/serving.md).

    python jobs/serve_scorer.py --prm runs/prm-ce --ref artifacts/policy
    python jobs/serve_scorer.py --config my_scorer.yaml --port 8001 --replicas 2
    PRM_RAY_SERVE_TOKEN=secret python jobs/serve_scorer.py --prm ... --host 0.0.0.0

Flags are the fields of prm_ray.serve.ServeConfig (--ref is --reference_model). The service listens on 127.0.0.1:8000 unless
--host/--port say otherwise, and runs until interrupted. `serve run cluster/serve_scorer.yaml`
starts the same application from a Serve config file.
"""

import ipaddress
import os
import sys
import time

import ray
from ray import serve

from prm_ray.cli import run_job
from prm_ray.serve import ServeConfig, build_app
from prm_ray.serve.app import ALIASES
from prm_ray.serve.config import resolved_config

CONFIG = ServeConfig


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(cfg: ServeConfig) -> None:
    cfg = resolved_config(cfg)
    if not _is_loopback(cfg.host) and not os.environ.get(cfg.auth_token_env):
        print(f"warning: serving on {cfg.host} without auth; set {cfg.auth_token_env} to require a bearer token",
              file=sys.stderr)
    ray.init(address=cfg.ray_address, include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
    print(f"PRM scorer on http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/docs (Ctrl-C stops it)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def main(argv=None) -> None:
    run_job(run, CONFIG, argv, aliases=ALIASES)


if __name__ == "__main__":
    main()
