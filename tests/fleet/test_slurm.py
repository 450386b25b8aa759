"""`evalprov apply` on a REAL Slurm 22.05 cluster (tests/testbed/slurm.py): slurmctld and
munged on the controller's fleet address, a slurmd in each fake host, fake GPU gres. h1 is
the login node, reached with Ansible over SSH; the job runs on whichever node Slurm picks.

The seed's own example (execution: slurm/default) runs with overrides only for the login
node, images and paths: ONE job serves the stand-in vLLM server once and runs both tasks with
NVIDIA's real harness (its image, from the fleet's registry); scores come home into the same
ledger and layout as bare-metal runs. Also: --check submits nothing, a job that hits its time
limit or is cancelled keeps its finished tasks and fails the rest, `--rerun failed` submits
only those, destroy cancels, and secrets never reach the script, the cluster's disk, a
process listing or the controller's files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.testbed import STANDIN_IMAGE
from tests.testbed.slurm import ACCOUNT, PARTITION
from tests.testbed.util import beside, wait_for

pytestmark = pytest.mark.fleet

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "examples" / "nel_seed.yaml"
SECRET = "hf_evalprov_slurm_secret_5c1e"  # grepped for everywhere evalprov writes
DEADLINE = 420  # seconds any one apply may take here


@pytest.fixture
def cluster(slurm_cluster):
    return slurm_cluster


@pytest.fixture
def work(cluster, tmp_path):
    """A per-test output_dir on the cluster's shared filesystem, and no job left behind."""
    remote = cluster.dir / "shared" / tmp_path.name
    remote.mkdir(parents=True)
    yield remote
    cluster.cancel_all()
    for h in cluster.fleet.hosts:
        names = cluster.fleet.docker(h.name, "ps", "-aq", check=False).stdout.decode().split()
        if names:
            cluster.fleet.docker(h.name, "rm", "-f", *names, check=False)


def seed_overrides(cluster, remote: Path, local: Path, *extra: str) -> list[str]:
    image = cluster.eval_image
    return [
        "-o", "execution.hostname=h1", "-o", f"execution.account={ACCOUNT}",
        "-o", f"execution.partition={PARTITION}", "-o", f"execution.output_dir={remote}",
        "-o", f"execution.local_output_dir={local}", "-o", "execution.gres=gpu:2",
        "-o", "execution.endpoint_readiness_timeout=120",
        "-o", f"deployment.image={STANDIN_IMAGE}", "-o", "deployment.data_parallel_size=2",
        "-o", f"evaluation.tasks.0.container={image}",
        "-o", f"evaluation.tasks.1.container={image}",
        "-o", "evaluation.nemo_evaluator_config.config.params.limit_samples=3",
        "-o", "evaluation.nemo_evaluator_config.config.params.max_new_tokens=32",
        *extra,
    ]


def evalprov(cluster, *args: str, env_extra: dict | None = None,
             timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "HF_TOKEN_FOR_GPQA_DIAMOND": SECRET, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "evalprov.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def apply_seed(cluster, remote, local, *extra, check=False, **kw):
    args = ["apply", str(SEED), "-i", str(cluster.inventory),
            *seed_overrides(cluster, remote, local, *extra)]
    if check:
        args.append("--check")
    return evalprov(cluster, *args, **kw)


def summary(local: Path) -> dict:
    runs = sorted(p for p in local.iterdir() if (p / "summary.json").exists())
    return json.loads((runs[-1] / "summary.json").read_text())


def apply_both_succeed(cluster, work, local, look, *extra, **kw):
    """apply_seed with look() every 0.5 s beside it; once both tasks succeeded: apply's
    process, the run's summary, its job directory and the driver's final state."""
    def watch(done: threading.Event) -> None:
        while not done.is_set():
            look()
            done.wait(0.5)

    with beside(watch):
        proc = apply_seed(cluster, work, local, *extra, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(local)
    assert {t["task"]: t["status"] for t in s["tasks"]} == {"ifeval": "succeeded",
                                                           "gpqa_diamond": "succeeded"}
    run_dir = work / s["run"]
    return proc, s, run_dir, json.loads((run_dir / "state.json").read_text())


def test_seed_example_runs_as_one_job_and_scores_come_home(cluster, work, tmp_path):
    local = tmp_path / "results"
    before = cluster.cmd("squeue", "-h", "-o", "%i")
    proc = apply_seed(cluster, work, local)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert before.strip() == ""
    s = summary(local)
    by_task = {t["task"]: t for t in s["tasks"]}
    assert set(by_task) == {"ifeval", "gpqa_diamond"}
    for name, metric in (("ifeval", "prompt_level_strict_acc"), ("gpqa_diamond", "score")):
        rec = by_task[name]
        assert rec["status"] == "succeeded", rec
        assert rec["host"] == "h1"
        assert rec["primary"]["metric"] == metric
        assert 0.0 <= rec["primary"]["score"] <= 1.0
    # ONE job served both tasks: the first of the chain ran the driver, once; its auto-resume
    # successor (queued behind it) was cancelled when every task was done, before it started
    run_dir = work / s["run"]
    jobs = (run_dir / "jobs").read_text().split()
    ran = sorted(p.name for p in run_dir.glob("state-*.json"))
    assert ran == [f"state-{jobs[0]}.json"], ran
    state = json.loads((run_dir / "state.json").read_text())
    assert state["phase"] == "done" and state["job"] == jobs[0]
    # the record holds the batch node's facts, read by the job beside the tasks
    host = s["record"]["hosts"]["h1"]
    node = next(h.name for h in cluster.fleet.hosts
                if cluster.fleet.exec(h.name, ["hostname"]).stdout.decode().strip()
                == state["node"])
    inspect = json.loads(cluster.fleet.docker(node, "image", "inspect", STANDIN_IMAGE).stdout)
    assert host["image"]["id"] == inspect[0]["Id"], host
    assert host["vllm_version"] == "0.0.0+evalprov.standin", host
    assert host["harness"][cluster.eval_image]["versions"]["nemo-evaluator"], host
    # the job's timeline: its queue wait, the server's start and load, the tasks, the fetch
    phases = {p["phase"]: p for p in s["timeline"]}
    assert {"queue", "start", "healthy", "eval", "fetch"} <= set(phases), phases
    for name in ("queue", "start", "healthy", "eval", "fetch"):
        assert phases[name]["finished"] >= phases[name]["started"], phases[name]
        assert phases[name]["status"] == "ok", phases[name]
    assert phases["healthy"]["started"] <= phases["eval"]["started"] <= phases["fetch"]["started"]
    assert cluster.job(jobs[0])["JobState"] == "COMPLETED"
    assert all(cluster.job(j)["JobState"] == "CANCELLED" for j in jobs[1:])
    print(proc.stderr)
    # live progress while it ran: the job's states and the tasks, per look
    assert "slurm" in proc.stderr and "evaluating" in proc.stderr
    # the job script and the job's state carry no secret; the secrets file is gone
    assert not (run_dir / "secrets.json").exists()
    leaked = [str(p) for root in (work, local) for p in root.rglob("*")
              if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert SECRET not in proc.stdout + proc.stderr
    for h in cluster.fleet.hosts:
        assert SECRET not in cluster.fleet.exec(h.name, ["ps", "auxeww"]).stdout.decode()
    # the job stopped its server: nothing of it runs on any node
    for h in cluster.fleet.hosts:
        assert cluster.fleet.docker(h.name, "ps", "-q").stdout.strip() == b""
    # status and results read the run from the local ledger
    st = evalprov(cluster, "status", "--output-dir", str(local))
    assert st.returncode == 0 and "ifeval" in st.stdout, st.stdout + st.stderr
    res = evalprov(cluster, "results", "--output-dir", str(local), "--format", "csv")
    assert "gpqa_diamond,h1,succeeded,score" in res.stdout, res.stdout
    logs = evalprov(cluster, "logs", s["run"], "--output-dir", str(local), "--task", "ifeval")
    assert logs.returncode == 0 and "ifeval" in logs.stdout, logs.stdout + logs.stderr
    # a second apply changes nothing and submits nothing
    again = apply_seed(cluster, work, local)
    assert again.returncode == 0, again.stderr
    assert "no job" in again.stderr
    assert cluster.squeue() == []


def test_a_two_node_job_serves_as_a_data_parallel_head_and_a_headless_worker(cluster, work,
                                                                            tmp_path):
    """execution.num_nodes 2: the job holds both nodes; the batch node serves the API with
    data-parallel ranks 0-1, the other node runs `vllm serve --headless` from rank 2 (an
    srun step of the same job); the head serves only once all four ranks joined, and the
    tasks run against it."""
    local = tmp_path / "results"
    seen: list[str] = []  # docker inspect of every container on the nodes, while it runs

    def look() -> None:
        for h in cluster.fleet.hosts:
            ids = cluster.fleet.docker(h.name, "ps", "-q", check=False).stdout.decode().split()
            if ids:
                seen.append(cluster.fleet.docker(h.name, "inspect", *ids,
                                                 check=False).stdout.decode())

    _proc, _s, run_dir, state = apply_both_succeed(
        cluster, work, local, look, "-o", "execution.num_nodes=2",
        "-o", "deployment.data_parallel_size=4",
        "-o", "deployment.env_vars.HF_TOKEN=host:EVALPROV_SLURM_DEP_TOKEN",
        env_extra={"EVALPROV_SLURM_DEP_TOKEN": SECRET})
    spec = json.loads((run_dir / "job.json").read_text())
    (w,) = spec["instances"][0]["group"]["workers"]
    worker_log = (run_dir / "evalprov-vllm-0.w1.log").read_text()
    # the worker ran on the node that is not the batch node, and joined the head there
    (line,) = [ln for ln in worker_log.splitlines() if ln.startswith("evalprov job worker 1")]
    assert f"on node {state['node']}:" not in line and "ranks from 2" in line, line
    addr = line.rsplit("head ", 1)[1]
    assert f"joined the data-parallel head at {addr}:29550 with rank(s) 2,3" in worker_log
    assert w["argv"][w["address_at"]] == ""  # the address is the node's, filled in there
    assert cluster.job(state["job"])["NumNodes"] == "2"
    # the deployment's secret reached head and worker (their servers' environment), read
    # from a root-only file in memory: never in a container's config
    head_log = (run_dir / "evalprov-vllm-0.log").read_text()
    for text in (head_log, worker_log):
        assert "secret environment names: HF_TOKEN" in text
    servers = [c for blob in seen for c in json.loads(blob or "[]")
               if (c["Config"]["Labels"] or {}).get("evalprov.managed") == "true"]
    assert {c["Name"].rsplit("-", 1)[-1] for c in servers} >= {"w1"}, "no worker was seen"
    for c in servers:
        assert SECRET not in json.dumps(c)
        assert "/run/evalprov-secrets.json" in [m["Destination"] for m in c["Mounts"]]
    for h in cluster.fleet.hosts:  # the files went with the containers
        left = cluster.fleet.exec(h.name, ["sh", "-c", "find /dev/shm/evalprov-* "
                                           "/run/user/*/evalprov-* -type f 2>/dev/null; true"])
        assert left.stdout.decode().split() == [], h.name
    # the job stopped both members: nothing of it runs on any node; no secret reached a
    # file or a process listing (the worker's come on its srun's stdin)
    for h in cluster.fleet.hosts:
        assert cluster.fleet.docker(h.name, "ps", "-q").stdout.strip() == b""
    leaked = [str(p) for root in (work, local) for p in root.rglob("*")
              if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_a_two_node_job_serves_one_pipeline_parallel_world(cluster, work, tmp_path):
    """num_nodes 2 with PP 2 (DP 1): vLLM's multi-node multiprocessing, the batch node node
    rank 0 (the API), the other node `--headless --node-rank 1` joining the head's master
    port; the head serves once it joined, the tasks run against it."""
    local = tmp_path / "results"
    proc = apply_seed(cluster, work, local, "-o", "execution.num_nodes=2",
                      "-o", "deployment.data_parallel_size=1",
                      "-o", "deployment.pipeline_parallel_size=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(local)
    assert {t["task"]: t["status"] for t in s["tasks"]} == {"ifeval": "succeeded",
                                                           "gpqa_diamond": "succeeded"}
    run_dir = work / s["run"]
    (w,) = json.loads((run_dir / "job.json").read_text())["instances"][0]["group"]["workers"]
    assert "--node-rank" in w["argv"] and "--data-parallel-start-rank" not in w["argv"]
    worker_log = (run_dir / "evalprov-vllm-0.w1.log").read_text()
    (line,) = [ln for ln in worker_log.splitlines() if ln.startswith("evalprov job worker 1")]
    assert "node rank 1, head " in line, line
    addr = line.rsplit("head ", 1)[1]
    assert (f"headless multiproc executor, with head node address {addr}:29501 for "
            "torch.distributed process group") in worker_log, worker_log[-2000:]
    for h in cluster.fleet.hosts:
        assert cluster.fleet.docker(h.name, "ps", "-q").stdout.strip() == b""


def test_several_instances_serve_one_per_node_behind_haproxy_on_the_batch_node(cluster, work,
                                                                             tmp_path):
    """execution.num_instances 2 over num_nodes 2 (NEL's topology): instance 0 on the batch
    node on loopback, instance 1 on the other node as an srun step, listening on that node's
    address and requiring the deployment's key; real Debian haproxy on the batch node spreads
    both tasks' requests over the two; the counts come home; the key reaches no file."""
    from evalprov import apikey
    from evalprov.apply import owner_id

    local = tmp_path / "results"
    statuses: list[str] = []  # each node's port 8000 asked from the other without a key
    h1, h2 = (h.name for h in cluster.fleet.hosts[:2])
    ask = ("import sys, urllib.request, urllib.error\n"
           "try:\n    urllib.request.urlopen(sys.argv[1], timeout=3); print(200)\n"
           "except urllib.error.HTTPError as e:\n    print(e.code)\n"
           "except OSError:\n    print('refused')\n")

    def look() -> None:
        for src, dst in ((h1, h2), (h2, h1)):
            url = f"http://{cluster.fleet.host(dst).ip}:8000/v1/models"
            out = cluster.fleet.exec(src, ["python3", "-c", ask, url], check=False)
            statuses.append(out.stdout.decode().strip())

    proc, s, run_dir, state = apply_both_succeed(cluster, work, local, look,
                                                 "-o", "execution.num_nodes=2",
                                                 "-o", "execution.num_instances=2")
    # instance 1 ran on the other node, on its address (the one haproxy reached it at)
    log1 = (run_dir / "evalprov-vllm-1.log").read_text()
    (line,) = [ln for ln in log1.splitlines() if ln.startswith("evalprov job member on node")]
    assert f"on node {state['node']}:" not in line, line
    addr = line.rsplit("head ", 1)[1]
    assert addr in {h.ip for h in cluster.fleet.hosts}, line
    assert '"${EVALPROV_NODE_1}":8000' in (run_dir / "haproxy.cfg").read_text()
    # every request went through the proxy, spread over both instances
    counts = s["proxy_requests"]["h1"]
    assert set(counts) == {"evalprov-vllm-0", "evalprov-vllm-1"}, counts
    assert all(n > 0 for n in counts.values()), counts
    assert f"proxy on h1: {sum(counts.values())} request(s) over 2 instance(s)" in proc.stdout
    # off the batch node the API is open, and refuses a request without the key
    assert "401" in statuses and "200" not in statuses, statuses
    key = apikey.derive(apikey.controller_secret(), owner_id(local.resolve()))
    leaked = [str(p) for root in (work, local) for p in root.rglob("*")
              if p.is_file() and key.encode() in p.read_bytes()]
    assert leaked == []
    assert key not in proc.stdout + proc.stderr
    for h in cluster.fleet.hosts:  # the job stopped every server and the proxy
        assert cluster.fleet.docker(h.name, "ps", "-q").stdout.strip() == b""
        assert "haproxy" not in cluster.fleet.exec(h.name, ["ps", "ax"]).stdout.decode()


def test_a_server_that_dies_ends_the_job_at_once_quoting_its_log(cluster, work, tmp_path):
    """The stand-in crashes 3 s after start (STANDIN_EXIT_AFTER) with vLLM-like log lines:
    the job ends at once (not at the readiness timeout), every task is failed with the
    server's decisive line first, and nothing is left running."""
    local = tmp_path / "results"
    proc = apply_seed(cluster, work, local, "-o", "deployment.env_vars.STANDIN_EXIT_AFTER=lit:3",
                      "-o", "deployment.env_vars.STANDIN_START_DELAY=lit:60",
                      "-o", "execution.endpoint_readiness_timeout=600")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for rec in summary(local)["tasks"]:
        assert rec["status"] == "failed"
        assert "vLLM stopped before it became healthy" in rec["error"], rec["error"]
        assert "Engine core initialization failed" in rec["error"], rec["error"]
    assert "Engine core initialization failed" in proc.stderr
    nothing_runs(cluster)


def test_a_server_lost_while_the_tasks_run_ends_them_at_once_named_first(cluster, work,
                                                                        tmp_path):
    """The job watches its server while the tasks run: killed mid-task (the stand-in answers
    one request, then takes 10 minutes for each), the running task ends within a few looks
    at its /health and the queued one never starts, each record naming the lost server
    first; the job's own message is not put before it (the job served to the end)."""
    local = tmp_path / "results"

    def kill_server(done) -> None:
        def served() -> str | None:
            for h in cluster.fleet.hosts:
                ids = cluster.fleet.docker(h.name, "ps", "-q", "--filter",
                                           "label=evalprov.managed=true",
                                           check=False).stdout.decode().split()
                log = next(iter(work.glob("*/tasks/*/logs/harness.log")), None)
                if ids and log is not None and b"Request completed" in log.read_bytes():
                    cluster.fleet.docker(h.name, "kill", *ids, check=False)
                    return h.name
            return None

        wait_for(lambda: done.is_set() or served(), timeout=DEADLINE, interval=0.5,
                 what="the task's first answered request")

    with beside(kill_server):
        proc = apply_seed(cluster, work, local, "-o", "execution.eval_concurrency=1",
                          "-o", "deployment.env_vars.STANDIN_SLOW_AFTER=lit:1",
                          "-o", "deployment.env_vars.STANDIN_SLOW_SECONDS=lit:600")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    recs = summary(local)["tasks"]
    assert [r["status"] for r in recs] == ["failed", "failed"], recs
    for rec in recs:
        assert rec["error"].startswith("its server stopped serving: "
                                       "http://127.0.0.1:8000/health did not answer"), rec
    nothing_runs(cluster)


def test_check_shows_the_script_and_submits_nothing(cluster, work, tmp_path):
    local = tmp_path / "results"
    proc = apply_seed(cluster, work, local, check=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "#SBATCH --gres=gpu:2" in proc.stderr
    assert f"#SBATCH --account={ACCOUNT}" in proc.stderr
    assert cluster.squeue() == []
    assert list(work.iterdir()) == []  # nothing written on the cluster
    # the GPU arithmetic and the cluster's answer are checked before anything is submitted
    bad = apply_seed(cluster, work, local, "-o", "execution.gres=gpu:1", check=True)
    assert bad.returncode == 2, bad.stderr
    assert "execution.gres gives 1 GPUs but one instance needs 2" in bad.stderr
    bad = apply_seed(cluster, work, local, "-o", "execution.partition=nosuch", check=True)
    assert bad.returncode != 0
    assert "sbatch --test-only refused the job" in bad.stderr, bad.stderr
    assert "nosuch" in bad.stderr
    assert cluster.squeue() == [] and list(work.iterdir()) == []


def start_apply(cluster, remote, local, *extra) -> subprocess.Popen:
    import os

    env = {**os.environ, "HF_TOKEN_FOR_GPQA_DIAMOND": SECRET}
    args = ["apply", str(SEED), "-i", str(cluster.inventory),
            *seed_overrides(cluster, remote, local, *extra)]
    return subprocess.Popen([sys.executable, "-m", "evalprov.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_tasks(remote: Path, want: dict[str, str], proc: subprocess.Popen,
               timeout: float = 300) -> tuple[Path, dict]:
    """The run's job directory once the driver reports the wanted task states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for state_file in remote.glob("*/state.json"):
            try:
                state = json.loads(state_file.read_text())
            except ValueError:
                continue
            if all(state["tasks"].get(k) == v for k, v in want.items()):
                return state_file.parent, state
        time.sleep(1)
    proc.kill()
    raise AssertionError(f"tasks never reached {want}: {proc.communicate()}")


def nothing_runs(cluster) -> None:
    for h in cluster.fleet.hosts:
        assert cluster.fleet.docker(h.name, "ps", "-q").stdout.strip() == b"", h.name
        ps = cluster.fleet.exec(h.name, ["ps", "-eo", "args"]).stdout.decode()
        assert "nemo-evaluator" not in ps and "evalprov_job" not in ps, ps


# after ifeval's requests every answer takes 150 s: gpqa_diamond outlives a job's walltime
SLOW = ("-o", "deployment.env_vars.STANDIN_SLOW_AFTER=lit:3",
        "-o", "deployment.env_vars.STANDIN_SLOW_SECONDS=lit:150",
        "-o", "evaluation.nemo_evaluator_config.config.params.request_timeout=600")


def test_scancel_keeps_finished_tasks_fails_the_rest_and_cancels_the_resume(
        cluster, work, tmp_path):
    local = tmp_path / "results"
    proc = start_apply(cluster, work, local, *SLOW)
    run_dir, _state = wait_tasks(work, {"ifeval": "succeeded", "gpqa_diamond": "running"}, proc)
    jobs = (run_dir / "jobs").read_text().split()
    assert len(jobs) == 2  # the job and its auto-resume successor, queued behind it
    cluster.cmd("scancel", jobs[0])
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, out + err
    by_task = {t["task"]: t for t in summary(local)["tasks"]}
    assert by_task["ifeval"]["status"] == "succeeded"
    assert by_task["gpqa_diamond"]["status"] == "failed"
    assert "CANCELLED" in by_task["gpqa_diamond"]["error"]
    # a cancel is not a time limit: the successor was cancelled too and never ran
    assert cluster.job(jobs[1])["JobState"] == "CANCELLED"
    assert not (run_dir / f"state-{jobs[1]}.json").exists()
    nothing_runs(cluster)
    # --rerun failed submits a job for gpqa_diamond alone; ifeval is reused
    rerun = apply_seed(cluster, work, local, *SLOW, "--rerun", "failed")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 task(s) to run, 1 done before" in rerun.stderr
    tasks = {t["task"]: t for t in summary(local)["tasks"]}
    assert tasks["gpqa_diamond"]["status"] == "succeeded"
    assert tasks["ifeval"].get("reused_from")


def test_time_limit_keeps_finished_tasks_and_auto_resume_runs_the_rest(
        cluster, work, tmp_path):
    """The first job serves and finishes ifeval, then reaches its time limit inside
    gpqa_diamond (it stops what it started, keeps ifeval and fails gpqa_diamond); its
    successor (afternotok, NEL's auto-resume capped by max_walltime) serves again and runs
    only gpqa_diamond. The limit is brought forward once ifeval has finished (scontrol), so
    a slow start on a loaded machine cannot use up the walltime before ifeval is done."""
    local = tmp_path / "results"
    proc = start_apply(cluster, work, local, *SLOW, "-o", "execution.walltime=00:10:00",
                       "-o", "execution.max_walltime=00:20:00")
    run_dir, _state = wait_tasks(work, {"ifeval": "succeeded", "gpqa_diamond": "running"}, proc)
    first_job = (run_dir / "jobs").read_text().split()[0]
    # the end 2-3 minutes from now: Slurm's warning (120 s before it) comes within a minute
    h, m, sec = (int(x) for x in cluster.job(first_job)["RunTime"].split(":"))
    minutes = (h * 3600 + m * 60 + sec) // 60 + 3
    cluster.cmd("scontrol", "update", f"JobId={first_job}", f"TimeLimit={minutes}")
    out, err = proc.communicate(timeout=DEADLINE)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by_task = {t["task"]: t for t in summary(local)["tasks"]}
    assert {k: v["status"] for k, v in by_task.items()} == {
        "ifeval": "succeeded", "gpqa_diamond": "succeeded"}
    run_dir = work / summary(local)["run"]
    jobs = (run_dir / "jobs").read_text().split()
    ran = [j for j in jobs if (run_dir / f"state-{j}.json").exists()]
    assert len(ran) == 2, (jobs, ran)
    first = json.loads((run_dir / f"state-{ran[0]}.json").read_text())
    second = json.loads((run_dir / f"state-{ran[1]}.json").read_text())
    assert first["tasks"] == {"ifeval": "succeeded", "gpqa_diamond": "failed"}
    assert "time limit" in first["message"]
    assert second["tasks"] == {"ifeval": "succeeded", "gpqa_diamond": "succeeded"}
    assert cluster.job(ran[0])["JobState"] in ("TIMEOUT", "FAILED")
    assert cluster.job(ran[1])["JobState"] == "COMPLETED"
    assert len(jobs) == 2  # max_walltime 20 min / walltime 10 min: one resume, no more
    assert "job " + ran[0] in proc.stderr and "job " + ran[1] in proc.stderr
    nothing_runs(cluster)


def wait_queued(cluster, proc: subprocess.Popen, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        jobs = cluster.squeue()
        if jobs:
            return jobs
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no job was queued: {proc.communicate()}")


def test_ctrl_c_cancels_the_job_and_destroy_cancels_a_queued_one(cluster, work, tmp_path):
    """A held job (sbatch --hold, from sbatch_extra_flags) stays queued: Ctrl-C on the apply
    that follows it cancels it (exit 130, the run recorded as interrupted), and so does
    `evalprov destroy` from another shell (the apply then ends with exit 1)."""
    import signal

    local = tmp_path / "results"
    held = ("-o", "execution.sbatch_extra_flags.hold=true")
    proc = start_apply(cluster, work, local, *held)
    (job,) = [j for j in wait_queued(cluster, proc) if j["state"] == "PENDING"][:1]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 130, out + err
    assert "cancelling this run's Slurm job" in err
    assert cluster.squeue() == []
    assert cluster.job(job["id"])["JobState"] == "CANCELLED"
    st = evalprov(cluster, "status", "--output-dir", str(local))
    assert "interrupted" in st.stdout, st.stdout + st.stderr
    assert "CANCELLED" in json.dumps(summary(local))

    # the interrupted run's tasks are failed: --rerun failed continues (DESIGN's exit 130)
    proc = start_apply(cluster, work, local, *held, "--rerun", "failed")
    wait_queued(cluster, proc)
    gone = evalprov(cluster, "destroy", str(SEED), "-i", str(cluster.inventory),
                    *seed_overrides(cluster, work, local, *held))
    assert gone.returncode == 0, gone.stdout + gone.stderr
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, out + err
    assert "CANCELLED" in out + err
    assert cluster.squeue() == []
    nothing_runs(cluster)
    st = evalprov(cluster, "status", "--output-dir", str(local))
    assert "serving" not in st.stdout, st.stdout
