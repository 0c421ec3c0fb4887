"""Scale-out: the cluster files pass Ray's own validation, the paper-setting config fits their node
types, an autoscaler adds a GPU node when a stage's config asks for one (and the stage runs
there), and `ray job submit` runs a job whose outputs land where its flags say.

The cluster tests run two private Ray heads in a subprocess (tests/local_cluster.py): free
ports, their own temp dirs and token, torn down by pid, never touching the session's `ray_session`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pyarrow as pa
import pytest
import yaml

from prm_ray.artifacts import run_exists, train_run_location
from prm_ray.config import ConfigError
from prm_ray.resources import autoscaler_config, node_types, plan
from prm_ray.study.preflight import load_config, main

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
PAPER_CONFIG = REPO / "configs" / "llama3-8b-math.yaml"
GPU_CLUSTERS = ["aws-gpu.yaml", "kuberay-cluster.yaml"]


# ------------------------------------------------------------------------------------------------
# Cluster files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "fake-multinode.yaml"])
def test_launcher_yaml_passes_rays_validation(name):
    config = autoscaler_config(CLUSTER / name)  # Ray's prepare_config (as `ray up`) + validate_config
    types = node_types(config)
    head = types.pop(config["head_node_type"])
    assert "GPU" not in head.resources and head.resources["CPU"] >= 1
    gpu = {n: t for n, t in types.items() if t.resources.get("GPU")}
    assert gpu, "a GPU worker type"
    for n, t in gpu.items():
        spec = config["available_node_types"][n]
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1, n  # scale from and to zero
        assert any(k.startswith("accelerator_type:") for k in t.resources), n
    assert config["idle_timeout_minutes"] > 0


def test_aws_yaml_installs_this_project_on_every_node():
    config = autoscaler_config(CLUSTER / "aws-gpu.yaml")
    setup = "\n".join(config["worker_setup_commands"])
    assert "scripts/install.sh" in setup and "EXTRAS=gpu" in setup and "/mnt/shared" in setup
    assert config["file_mounts"] == {"~/prm-ray": "."}
    assert setup == "\n".join(config["head_setup_commands"][: len(config["worker_setup_commands"])])


def test_validation_rejects_a_broken_node_type(tmp_path):
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    config["available_node_types"]["gpu_l40s"]["resources"]["GPU"] = "one"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(jsonschema.ValidationError):
        autoscaler_config(bad)


def test_kuberay_manifests_have_the_expected_structure():
    import ray

    pvc, ray_cluster = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-cluster.yaml").read_text()) if d]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert ray_cluster["kind"] == "RayCluster" and ray_cluster["apiVersion"] == "ray.io/v1"
    spec = ray_cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["rayVersion"] == ray.__version__  # the image's Ray must be the CLI's
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
    for pod in pods:
        container = pod["containers"][0]
        assert container["image"] == pods[0]["containers"][0]["image"]
        assert container["resources"]["limits"] == container["resources"]["requests"]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}
    head_limits = pods[0]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    for name, gpus in (("gpu-l40s", "1"), ("gpu-a100x8", "8")):
        g = groups[name]
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus

    # What the KubeRay autoscaler derives from this RayCluster, validated by Ray's schema.
    types = node_types(autoscaler_config(CLUSTER / "kuberay-cluster.yaml"))
    assert types["gpu-l40s"].resources["accelerator_type:L40S"] == 1 and types["gpu-l40s"].resources["GPU"] == 1
    assert types["gpu-a100x8"].resources["GPU"] == 8 and types["gpu-a100x8"].max_count == 1

    [job] = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-job.yaml").read_text()) if d]
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": ray_cluster["metadata"]["name"]}
    entry = job["spec"]["entrypoint"].split()
    assert entry[0] == "python" and Path(entry[1]).name == "scale_responses.py"
    assert entry[entry.index("--config") + 1].endswith("configs/llama3-8b-math.yaml")


# ------------------------------------------------------------------------------------------------
# The paper-setting config and the resource plan
# ------------------------------------------------------------------------------------------------


def test_paper_config_is_the_papers_setting_with_gpus():
    from prm_ray.config import from_dict, load_yaml
    from prm_ray.study import ScaleResponsesConfig

    cfg = from_dict(ScaleResponsesConfig, load_yaml(PAPER_CONFIG))
    assert cfg.policy.endswith("Llama-3.1-8B-Instruct") and cfg.reference_model is None  # policy = reference
    t = cfg.train
    assert (t.beta, t.lr, t.global_batch_size, t.epochs) == (0.05, 5e-7, 64, 1)
    assert cfg.train_rollouts.sampling.n == 8 and cfg.train_rollouts.limit is None
    tr = cfg.test_rollouts
    assert tr.task == "math" and tr.instructions is None and tr.split == "test" and tr.limit is None  # MATH-500
    assert tr.sampling.n == 64 and max(cfg.eval.ns or [tr.sampling.n]) == 64
    for rc in (cfg.train_rollouts, tr):
        assert rc.engine.num_gpus == 1 and rc.engine.accelerator_type == "L40S"
    assert t.workers.num_gpus > 0 and t.workers.accelerator_type == "A100" and t.strategy == "fsdp"
    assert t.ref_pass.num_gpus == 1 and cfg.eval.num_gpus == 1
    assert Path(cfg.runs_dir).is_absolute()


@pytest.mark.parametrize("cluster", GPU_CLUSTERS)
def test_every_stage_of_the_paper_config_fits_the_gpu_clusters(cluster):
    lines, problems = plan(load_config(PAPER_CONFIG), CLUSTER / cluster)
    assert problems == []
    rows = {line.split()[0]: line for line in lines[1:]}
    # accelerator_type routes each GPU stage to its node type, and only there.
    assert rows["train_rollouts.engine"].endswith("l40s (1)")
    assert rows["train"].endswith("a100x8 (8)")


def test_plan_names_what_can_never_be_scheduled(tmp_path, capsys):
    data = yaml.safe_load(PAPER_CONFIG.read_text())
    data["runs_dir"] = "runs"
    data["train_rollouts"]["engine"].update(num_gpus=2, tensor_parallel_size=2)  # 1-GPU L40S nodes
    data["train"]["workers"]["replicas"] = 16  # one 8-GPU node at most
    data["eval"]["accelerator_type"] = "H100"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    _, problems = plan(load_config(path), CLUSTER / "aws-gpu.yaml")
    text = "\n".join(problems)
    assert "runs_dir 'runs' is relative" in text
    assert "train_rollouts.engine: one replica asks for CPU=4, GPU=2" in text
    assert "train: 16 replicas" in text and "room for 8" in text
    assert "eval: one replica" in text and "accelerator_type:H100" in text
    assert main(["--config", str(path), "--cluster", str(CLUSTER / "aws-gpu.yaml")]) == 1
    assert "PROBLEM: train: 16 replicas" in capsys.readouterr().err


def test_tensor_parallel_replicas_must_hold_their_gpus():
    from prm_ray.stages.rollout import EngineConfig, RolloutConfig

    with pytest.raises(ConfigError, match=r"engine.num_gpus \(1\) must equal engine.tensor_parallel_size \(2\)"):
        RolloutConfig(engine=EngineConfig(num_gpus=1, tensor_parallel_size=2))
    RolloutConfig(engine=EngineConfig(num_gpus=2, tensor_parallel_size=2))
    RolloutConfig(engine=EngineConfig(num_gpus=0, tensor_parallel_size=1))


def test_reference_pass_asks_ray_data_for_its_accelerator_type(monkeypatch, tmp_path):
    import ray.data

    from prm_ray.stages.logprobs import LogprobPassConfig
    from prm_ray.stages.train import TrainConfig
    from prm_ray.stages.train.driver import add_reference_logprobs

    calls = []

    class Recorder:
        def __init__(self, table):
            self.table = table

        def repartition(self, n):
            return self

        def map_batches(self, fn, **kwargs):
            calls.append(kwargs)
            return self

        def iter_batches(self, **kwargs):  # the reference pass's output: one log-prob per sequence
            yield self.table.append_column("ref_logp", pa.array([0.0] * self.table.num_rows, pa.float64()))

    monkeypatch.setattr(ray.data, "from_arrow", Recorder)
    examples = pa.table({"prompt": ["1+1"], "response": ["2"], "label": [1.0]})
    add_reference_logprobs(examples, TrainConfig(ref_pass=LogprobPassConfig(num_gpus=1, accelerator_type="A10G")),
                           tmp_path)
    assert calls[0]["accelerator_type"] == "A10G" and calls[0]["num_gpus"] == 1


# ------------------------------------------------------------------------------------------------
# Storage for Ray Train
# ------------------------------------------------------------------------------------------------


def test_train_storage_gives_each_prm_its_own_run(tmp_path):
    out_a, out_b = tmp_path / "prms" / "ce-k1-abc", tmp_path / "prms" / "ce-k2-def"
    assert train_run_location(None, out_a) == (str(out_a.resolve() / "ray"), "train")
    store, name_a = train_run_location("s3://bucket/prm-ray/", out_a)
    assert store == "s3://bucket/prm-ray"
    _, name_b = train_run_location("s3://bucket/prm-ray", out_b)
    assert name_a != name_b and name_a.startswith("ce-k1-abc-")
    assert train_run_location("s3://bucket/prm-ray", out_a)[1] == name_a  # a resubmission resumes
    assert not run_exists(str(tmp_path / "storage"), name_a)
    (tmp_path / "storage" / name_a).mkdir(parents=True)
    assert run_exists(str(tmp_path / "storage"), name_a)


# ------------------------------------------------------------------------------------------------
# A real (fake-multinode) autoscaling cluster and `ray job submit`
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_run(tiny_policy_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    spec = {"policy": tiny_policy_path, "workdir": str(work), "repo": str(REPO),
            "autoscaling_config": str(CLUSTER / "fake-multinode.yaml")}
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "local_cluster.py"), str(work / "spec.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the harness tears its cluster down on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the cluster scenario timed out:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"harness failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    result["workdir"] = work
    return result


def test_autoscaler_adds_a_gpu_node_and_the_gpu_stages_run_there(cluster_run):
    a = cluster_run["autoscaling"]
    [head_resources] = a["nodes_before"]  # the head alone at the start, without GPUs
    assert "GPU" not in head_resources
    gpu_nodes = {nid for nid, n in a["nodes"].items() if n["resources"].get("accelerator_type:L40S")}
    assert gpu_nodes and a["head"] not in gpu_nodes
    samplers = [nid for cls, nids in a["actors"].items() if "ScriptedSampler" in cls for nid in nids]
    scorers = [nid for cls, nids in a["actors"].items() if "ModelPass" in cls for nid in nids]
    verifiers = [nid for cls, nids in a["actors"].items() if "Verifier" in cls for nid in nids]
    assert samplers and set(samplers) <= gpu_nodes, a["actors"]
    assert scorers and set(scorers) <= gpu_nodes, a["actors"]
    assert verifiers and not set(verifiers) & gpu_nodes  # the CPU stage needs no GPU node
    assert a["rollouts"]["responses"] == 16 and a["rollouts"]["verify_status"] == {"ok": 16}
    assert a["ref_rows"] == 16


def test_ray_job_submit_runs_the_job_and_outputs_land_where_its_flags_say(cluster_run):
    job, work = cluster_run["job"], cluster_run["workdir"]
    assert "succeeded" in job["status"], job["status"] + job["log_tail"]
    out = work / "prm"
    report = json.loads((out / "train_report.json").read_text())
    assert report["status"] == "finished" and report["steps"] == 1
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    # Ray Train's checkpoints: under --storage_path, in this PRM's own run, not next to the PRM.
    storage, name = train_run_location(str(work / "storage"), out)
    assert list((Path(storage) / name).glob("checkpoint_*")), sorted(Path(storage).rglob("*"))[:20]
    assert not (out / "ray").exists()


def test_the_cluster_is_gone_afterwards(cluster_run):
    import psutil

    assert cluster_run["processes_ended"] > 0 and cluster_run["temp_dirs_removed"]
    leftovers = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("PRM_RAY_TEST_CLUSTER") == cluster_run["marker"]:
                leftovers.append((p.pid, " ".join(p.cmdline())[:200]))
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    assert not leftovers
