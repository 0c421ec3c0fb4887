"""Check that every stage of a config fits a cluster's node types, before paying for the cluster.

    python jobs/check_cluster.py --config configs/llama3-8b-math.yaml --cluster cluster/aws-gpu.yaml
    python jobs/check_cluster.py --config configs/llama3-8b-math-train.yaml --cluster cluster/kuberay-cluster.yaml

Prints each stage's request per replica and where it fits; exits 1 and names every problem
(a request no node type has, more replicas than the cluster's maximum size holds, a relative
runs_dir) otherwise.
"""

import sys

from prm_ray.study.preflight import main

if __name__ == "__main__":
    sys.exit(main())
