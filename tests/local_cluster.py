"""Private Ray clusters on this machine for tests/test_cluster.py, run as a separate process.

    python tests/local_cluster.py spec.json      # prints one line "RESULT <json>" at the end

Why a separate process: the pytest process may already hold the session-wide `ray.init` of
tests/conftest.py, and a driver connects to one cluster only. Why private: other Ray clusters
may be running on this machine (a `make demo` head on the default ports, other people's work),
so each head gets free ports, its own temp dir and an auth token of its own, and the fake
autoscaler is told its head's port (provider.gcs_address). Why a subreaper: `ray start` exits
after spawning the head's daemons, and the fake autoscaler spawns the worker nodes' daemons;
marked as subreaper, this process inherits them all as descendants, so teardown ends exactly
the processes these clusters started, by pid, instead of `ray stop`, which stops every Ray
process on the machine.

The scenario (what tests/test_cluster.py checks), on two heads started side by side:
1. autoscaling: a head with CPUs only, whose autoscaling config is cluster/fake-multinode.yaml.
   Two real pipeline stages ask for a GPU of type L40S through their configs: the rollout
   pipeline (vLLM replaced by a scripted sampler; the verifier and writer stages are real) and
   the evaluation's reference log-prob pass (the real scorer on a tiny model). The autoscaler
   has to add a gpu_l40s node for them to run at all.
2. job submission, on a plain head and meanwhile: `ray job submit --working-dir <repo>` of
   jobs/train_prm.py on a small rollout dataset, with a Ray Train storage path in its flags.
   Not on the fake cluster: its nodes share this machine's disk and session directory, and
   there the job's workers lost their working directory (os.getcwd() raising
   FileNotFoundError) when another fake node unpacked the same working_dir.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import yaml

PR_SET_CHILD_SUBREAPER = 36
RAY = str(Path(sys.executable).parent / "ray")


_HANDED_OUT: set[int] = set()


def free_ports(n: int) -> list[int]:
    """`n` ports that are free now, below the kernel's ephemeral range and never handed out twice.

    Below the ephemeral range because a port is only reserved until `ray start` binds it: a port
    from `bind(("", 0))` is in that range, where Ray's own random ports (a fake node's metrics
    exporter, a worker's gRPC server) and any outgoing connection can take it first. That race
    once gave a head's runtime-env agent port to a Prometheus exporter, and the job failed with
    "HTTP 405 ... use OPTIONS or GET". Above 20000: Ray's default worker ports are 10002-19999.
    """
    import random

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = [p for p in range(20000, min(low, 32768)) if p not in _HANDED_OUT]
    random.SystemRandom().shuffle(candidates)
    ports = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        ports.append(port)
        _HANDED_OUT.add(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"fewer than {n} free ports between 20000 and {low}")


def end_descendants(timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, every process descended from this one; returns how many there were."""
    import psutil

    me = psutil.Process()
    procs = me.children(recursive=True)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    # Orphans that died before we looked are our zombies now: reap them.
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    late = me.children(recursive=True)  # a daemon started while we were stopping the others
    for p in late:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs) + len(late)


class LocalHead:
    """`ray start --head` on free ports and in its own temp dir, optionally with a fake autoscaler.

    Started with `launch()` + `wait()`, so that two heads start side by side; stopped by
    `end_descendants()` in whoever launched it.
    """

    def __init__(self, num_cpus: int, autoscaling_config: str | None = None, dashboard: bool = True):
        import ray._private.services as services

        # Short: Ray's Unix sockets live under it, and socket paths are limited to 107 bytes.
        self.tmp = tempfile.mkdtemp(prefix="prmc-", dir="/tmp")
        (gcs, dash, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr) = free_ports(9)
        self.gcs_address = f"{services.get_node_ip_address()}:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        self.cmd = [RAY, "start", "--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                    f"--temp-dir={self.tmp}", "--disable-usage-stats", f"--include-dashboard={dashboard}",
                    f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                    f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
                    f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
                    "--min-worker-port=0", "--max-worker-port=0"]
        self.env = dict(os.environ)
        # Its own workers ask its own dashboard (Ray Train's state queries; see conftest.ray_session),
        # never the session cluster's, whose address this process's environment may carry.
        self.env.pop("RAY_API_SERVER_ADDRESS", None)
        if dashboard:
            self.env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        if autoscaling_config:
            config = yaml.safe_load(Path(autoscaling_config).read_text())
            config["provider"]["gcs_address"] = self.gcs_address
            path = Path(self.tmp) / "autoscaling.yaml"
            path.write_text(yaml.safe_dump(config))
            self.cmd.append(f"--autoscaling-config={path}")
            self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")

    def launch(self) -> LocalHead:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        return self

    def wait(self) -> LocalHead:
        out, _ = self.proc.communicate(timeout=180)
        if self.proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({self.proc.returncode}):\n{out}")
        return self


class ScriptedSampler:
    """Stands in for vLLM in the rollout pipeline: a right and a wrong answer per instruction, so
    the verifier labels both classes and the PRM has something to learn."""

    def __init__(self, model, engine, sampling, temperature):
        self.model, self.n = model, sampling["n"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = batch.to_pylist()[0]
        iids, responses = [], []
        for iid, gold in zip(shard["instruction_id"], shard["gold_answer"]):
            for j in range(self.n):
                iids.append(iid)
                answer = gold if j % 2 == 0 else str((int(gold) + 1) % 10)
                responses.append(f"Step 1: thinking\n\nThe answer is \\boxed{{{answer}}}")
        shard.update(sample_instruction_id=iids, sample_index=[i % self.n for i in range(len(iids))],
                     seed=list(range(len(iids))), model=self.model, generate_seconds=0.1,
                     engine_startup_seconds=0.0, response=responses, num_tokens=[8] * len(iids),
                     cumulative_logprob=[-1.0] * len(iids), finish_reason=["stop"] * len(iids))
        return pa.Table.from_pylist([shard])


def autoscaling_stages(spec: dict) -> dict:
    import ray

    from prm_ray.stages.evaluate import EvaluateConfig, reference_logprobs
    from prm_ray.stages.rollout import EngineConfig, RolloutConfig, SamplingConfig, VerifierConfig, run_rollouts
    from prm_ray.tasks.arith import ArithConfig

    head_id = ray.get_runtime_context().get_node_id()
    work = Path(spec["workdir"])
    t0 = time.time()
    rollouts = run_rollouts(RolloutConfig(
        model=spec["policy"], out=str(work / "rollouts"), task="arith", split="train", limit=8, shard_size=4,
        sampling=SamplingConfig(n=2, max_tokens=32, temperature=1.0),
        arith=ArithConfig(min_steps=1, max_steps=2, ops="+", num_train=50, num_validation=10, num_test=10),
        engine=EngineConfig(num_cpus=0.5, num_gpus=1, accelerator_type="L40S"),
        verifier=VerifierConfig(num_cpus=0.5), progress=False), sampler_cls=ScriptedSampler)
    rollout_s = time.time() - t0
    ref = reference_logprobs(work / "rollouts", spec["policy"], work / "ref",
                             EvaluateConfig(replicas=1, num_cpus=0.5, num_gpus=1, accelerator_type="L40S",
                                            batch_size=8, micro_batch_size=8))
    nodes = {n["NodeID"]: {"resources": n["Resources"], "labels": n.get("Labels", {}), "alive": n["Alive"]}
             for n in ray.nodes()}
    actors: dict[str, list[str]] = {}
    for a in ray._private.state.actors().values():
        actors.setdefault(a["ActorClassName"], []).append(a["Address"]["NodeID"])
    ray.shutdown()
    return {"head": head_id, "nodes": nodes, "actors": actors,
            "rollouts": rollouts, "ref_rows": ref["rows"], "rollout_seconds": rollout_s,
            "seconds": time.time() - t0}


def write_rollouts(out: Path) -> None:
    """A rollout dataset in the pipeline's schema, a right and a wrong answer per instruction."""
    import pyarrow.parquet as pq

    from prm_ray.stages.rollout import SCHEMA

    rows = []
    for i in range(8):
        for j, answer in enumerate((i % 10, (i + 1) % 10)):
            rows.append({"instruction_id": f"q{i}", "prompt": f"{i}+0", "sample_index": j,
                         "response": f"Step 1: {i}+0 = {answer}\n\nThe answer is \\boxed{{{answer}}}",
                         "gold_answer": str(i % 10), "extracted_answer": str(answer), "correct": j == 0,
                         "verify_status": "ok", "num_tokens": 20, "cumulative_logprob": -5.0,
                         "finish_reason": "stop", "model": "scripted", "seed": 2 * i + j})
    (out / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out / "data" / "shard-000000.parquet")


def submit_job(head: LocalHead, spec: dict) -> str:
    """`ray job submit --no-wait` of a tiny PRM training; the job runs while the autoscaling
    scenario does (on 2 shared cores, overlapping the two waits is most of the test's time)."""
    work = Path(spec["workdir"])
    write_rollouts(work / "job-rollouts")
    sid = f"prm-ray-test-{os.getpid()}"
    subprocess.run(
        [RAY, "job", "submit", "--no-wait", "--address", head.dashboard_url, "--working-dir", spec["repo"],
         "--submission-id", sid, "--", "python", "jobs/train_prm.py",
         "--data", str(work / "job-rollouts"), "--model", spec["policy"], "--out", str(work / "prm"),
         "--storage_path", str(work / "storage"), "--dataset.objective", "ce", "--workers.replicas", "1",
         "--workers.num_cpus", "0.5", "--global_batch_size", "8", "--micro_batch_size", "4",
         "--max_optimizer_steps", "1", "--checkpoint_every", "1000", "--ref_pass.replicas", "1"],
        check=True, capture_output=True, text=True, timeout=120)
    return sid


def wait_for_job(head: LocalHead, sid: str, timeout: float = 360.0) -> dict:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    t0 = time.time()
    while client.get_job_status(sid) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.time() - t0 > timeout:
            break
        time.sleep(2)
    status = subprocess.run([RAY, "job", "status", "--address", head.dashboard_url, sid],
                            capture_output=True, text=True, timeout=60)
    return {"status": status.stdout + status.stderr, "log_tail": client.get_job_logs(sid)[-4000:],
            "waited_seconds": time.time() - t0}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # Before Ray is imported, which reads the auth mode once: every process of the cluster, the
    # driver and the CLI calls authenticate with this token, and ~/.ray/auth_token (shared with
    # any other head on this machine) is left alone. PATH makes the job's `python` this one.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                      PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    # Inherited by every process of the cluster (Ray workers rename themselves, so their command
    # lines cannot be recognised): the test looks for survivors by it.
    os.environ["PRM_RAY_TEST_CLUSTER"] = marker = secrets.token_hex(8)
    # pytest's timeout sends SIGTERM: tear the clusters down on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    import ray

    result: dict = {"marker": marker}
    t0 = time.time()
    # Two heads: the job gets one without fake nodes (see the module docstring).
    heads = []
    try:
        scaling = LocalHead(num_cpus=2, autoscaling_config=spec["autoscaling_config"], dashboard=False)
        heads.append(scaling)
        jobs = LocalHead(num_cpus=2)
        heads.append(jobs)
        for h in (scaling.launch(), jobs.launch()):
            h.wait()
        result["start_seconds"] = time.time() - t0
        sid = submit_job(jobs, spec)  # runs while the autoscaling scenario does
        ray.init(address=scaling.gcs_address, log_to_driver=False, logging_level="WARNING")
        nodes_before = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        result["autoscaling"] = {"nodes_before": nodes_before, **autoscaling_stages(spec)}
        result["job"] = wait_for_job(jobs, sid)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        result["processes_ended"] = end_descendants()
        for h in heads:
            shutil.rmtree(h.tmp, ignore_errors=True)
    result["temp_dirs_removed"] = not any(Path(h.tmp).exists() for h in heads)
    result["seconds"] = time.time() - t0
    print("RESULT " + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
