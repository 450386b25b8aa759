"""The Slurm job as evalprov decides it (evalprov/slurm.py, decide.decide_slurm): sbatch's
options, the rendered script (every value one quoted shell word, nothing templated), the
driver's job.json, the login node's facts against it, the auto-resume budget, and how a task
that did not finish is explained. Pure: no cluster (tests/fleet/test_slurm.py has one)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from evalprov import slurm
from evalprov.config.loader import load_config
from evalprov.decide import Inputs, decide_slurm
from evalprov.errors import PlanError

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "examples" / "nel_seed.yaml"
HOST = "your-cluster-headnode"


def seed(*overrides: str):
    """The seed with -o overrides (written as on the command line, "-o" words skipped)."""
    return load_config(SEED, [o for o in overrides if o != "-o"]).config


def decision(*overrides: str, raw=None, previous=None, rerun=None):
    inputs = Inputs(config=seed(*overrides), hosts=(), run_id="r1", owner="own",
                    previous=previous or {}, rerun=rerun)
    return decide_slurm(inputs, raw or {})


def test_seed_is_one_job_with_nels_directives_and_the_driver():
    d = decision()
    v = d.host_vars[HOST]
    argv = v["evalprov_slurm_sbatch_argv"]
    assert argv[:2] == ["sbatch", "--parsable"]
    for opt in ("--job-name=nemo-evaluator-launcher.evalprov-own", "--account=your-account",
                "--partition=batch", "--nodes=1", "--ntasks-per-node=1", "--time=02:00:00",
                "--gres=gpu:8", "--exclusive", "--no-requeue",
                "--output=/path/to/output/r1/slurm-%j.out", "--signal=B:USR1@120"):
        assert opt in argv, opt
        assert f"#SBATCH {opt}" in v["evalprov_slurm_script"]
    assert v["evalprov_slurm_dir"] == "/path/to/output/r1"
    spec = v["evalprov_slurm_spec"]
    assert [t["name"] for t in spec["tasks"]] == ["ifeval", "gpqa_diamond"]
    assert all(t["dir"].startswith("/path/to/output/r1/tasks/") for t in spec["tasks"])
    (entry,) = spec["instances"]
    assert entry["instance"]["argv"][:2] == ["vllm", "serve"]
    assert "127.0.0.1" in entry["instance"]["argv"]  # the harness is in the same job
    assert (entry["node"], entry["group"], entry["host_at"], spec["proxy"]) == (0, None, None,
                                                                              None)
    assert spec["walltime"] == 7200
    assert spec["resumes_left"] == slurm.MAX_RESUMES  # 120 h / 2 h - 1, capped
    assert len(d.to_run) == 2 and v["evalprov_state"] == "pending"


def test_the_script_is_valid_bash_and_runs_only_the_driver():
    script = decision().host_vars[HOST]["evalprov_slurm_script"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    body = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert body[-1].startswith("exec python3 -m ansible_collections.evalprov.fleet.plugins."
                               "module_utils.evalprov_job ")


@pytest.mark.parametrize("value", [
    "acct$(touch /tmp/evalprov-pwned)", "acct`id`", "acct; rm -rf /", "{{ 7 * 7 }}",
    "{% raw %}x", "'quoted'", 'a"b'])
def test_hostile_values_are_one_quoted_word_and_never_templated(value):
    v = decision("-o", f"execution.account={json.dumps(value)}").host_vars[HOST]
    script = v["evalprov_slurm_script"]
    assert f"--account={value}" in v["evalprov_slurm_sbatch_argv"]  # an argv, no shell
    line = next(x for x in script.splitlines() if "--account=" in x)
    assert shlex.split(line.removeprefix("#SBATCH ")) == [f"--account={value}"]
    assert "49" not in line


@pytest.mark.parametrize("override, field", [
    ("execution.sbatch_extra_flags.comment=x", "evalprov sets --comment itself"),
    ("execution.sbatch_extra_flags.dependency=afterok:1", "evalprov sets --dependency"),
    ("execution.sbatch_extra_flags.wrap=true", "evalprov sets --wrap"),
    ("execution.sbatch_extra_flags={'bad name': 1}", "is not an sbatch option name"),
    ("execution.sbatch_extra_flags.mem=[1, 2]", "is not a value of an option"),
])
def test_extra_flags_evalprov_sets_or_that_are_not_options_are_refused(override, field):
    with pytest.raises(PlanError) as err:
        decision("-o", override)
    assert field in str(err.value)
    assert "execution.sbatch_extra_flags" in str(err.value)


def test_a_control_character_never_reaches_the_script():
    with pytest.raises(PlanError, match="control character"):
        decision("-o", "execution.sbatch_extra_flags.mem=" + json.dumps("4G\n#SBATCH --wrap=id"))


def test_extra_flags_true_false_and_values():
    argv = decision("-o", "execution.sbatch_extra_flags={exclusive: false, mem: 4G, "
                    "hold: true, cpus_per_task: 4}").host_vars[HOST][
        "evalprov_slurm_sbatch_argv"]
    assert "--exclusive" not in argv
    assert {"--mem=4G", "--hold", "--cpus-per-task=4"} <= set(argv)


def test_cpu_device_asks_for_no_gres_and_process_runtime_checks_venvs():
    v = decision("-o", "execution.device=cpu", "-o", "execution.runtime=process").host_vars[
        HOST]
    assert not any(a.startswith("--gres") for a in v["evalprov_slurm_sbatch_argv"])
    assert v["evalprov_slurm_paths"] == {
        "execution.vllm_venv": "/opt/evalprov/vllm-venv/bin/vllm",
        "execution.vllm_venv (its python)": "/opt/evalprov/vllm-venv/bin/python",
        "execution.harness_venv": "/opt/evalprov/harness-venv/bin/nemo-evaluator",
        "execution.harness_venv (its python)": "/opt/evalprov/harness-venv/bin/python"}


def test_login_node_facts_become_one_line_problems():
    ok = {"sbatch": "/usr/bin/sbatch", "test_only": {"ok": True, "message": ""},
          "paths": {}, "jobs": []}
    assert decision(raw={HOST: ok}).problems == ()
    refused = {**ok, "test_only": {"ok": False, "message": "sbatch: error: invalid partition"}}
    (line,) = decision(raw={HOST: refused}).problems
    assert "sbatch --test-only refused the job" in line and "invalid partition" in line
    assert "partition 'batch'" in line
    (line,) = decision(raw={HOST: {**ok, "sbatch": None}}).problems
    assert "sbatch is not on the login node's PATH" in line
    queued = {**ok, "jobs": [{"id": "12", "state": "RUNNING"}]}
    (line,) = decision(raw={HOST: queued}).problems
    assert "still queued or running (12 RUNNING)" in line and "evalprov destroy" in line
    ckpt = decision("-o", "deployment.checkpoint_path=/models/x", raw={HOST: {
        **ok, "paths": {"deployment.checkpoint_path": {"exists": False}}}})
    (line,) = ckpt.problems
    assert "deployment.checkpoint_path: /models/x does not exist on the cluster" in line


def test_gres_too_small_for_the_parallel_sizes_is_refused_before_anything():
    with pytest.raises(PlanError) as err:
        decision("-o", "execution.gres=gpu:4")
    assert "execution.gres gives 4 GPUs but one instance needs 8" in str(err.value)


def test_several_instances_are_one_per_node_behind_the_batch_nodes_proxy_and_keyed():
    """execution.num_instances 2 over num_nodes 2 (NEL's topology): instance 0 on the batch
    node on loopback, instance 1 on the other node listening on that node's address (filled
    in there) and so requiring the deployment's key; haproxy on the batch node in front of
    both (the other node's address in its environment); the tasks call the proxy and send
    the key."""
    d = decision("-o", "execution.num_nodes=2", "-o", "execution.num_instances=2")
    spec = d.host_vars[HOST]["evalprov_slurm_spec"]
    first, second = spec["instances"]
    assert (first["node"], second["node"]) == (0, 1)
    assert (first["group"], second["group"], first["host_at"]) == (None, None, None)
    a0, a1 = first["instance"]["argv"], second["instance"]["argv"]
    assert a0[a0.index("--host") + 1] == "127.0.0.1"
    assert a1[second["host_at"] - 1] == "--host" and a1[second["host_at"]] == "<node address>"
    assert first["instance"]["port"] == second["instance"]["port"] == 8000
    assert "VLLM_API_KEY" in first["instance"]["env_names"]
    px = spec["proxy"]
    assert (px["port"], px["stats_port"], px["node_env"]) == (5009, 5010, "EVALPROV_NODE_")
    assert px["servers"] == ["evalprov-vllm-0", "evalprov-vllm-1"]
    assert "    server evalprov-vllm-0 127.0.0.1:8000" in px["config"]
    assert '    server evalprov-vllm-1 "${EVALPROV_NODE_1}":8000' in px["config"]
    assert "    bind 127.0.0.1:5009" in px["config"]
    for t in spec["tasks"]:
        ep = t["run_config"]["target"]["api_endpoint"]
        assert ep["url"].startswith("http://127.0.0.1:5009/"), ep
        assert ep["api_key_name"] == "EVALPROV_API_KEY"
    (hp,) = d.plan.hosts
    assert [i.node for i in hp.instances] == [0, 1] and hp.proxy is not None


def test_several_instances_over_groups_of_nodes_each_have_their_head_and_workers():
    """num_instances 2 over num_nodes 4: each instance spans 2 nodes (DP 16 as 8 ranks per
    node), instance 1's head on node 2 with its worker on node 3 (worker nodes count from
    the instance's head)."""
    d = decision("-o", "execution.num_nodes=4", "-o", "execution.num_instances=2",
                 "-o", "deployment.data_parallel_size=16")
    first, second = d.host_vars[HOST]["evalprov_slurm_spec"]["instances"]
    assert (first["node"], second["node"]) == (0, 2)
    for e in (first, second):
        g = e["group"]
        assert (g["nodes"], g["local"]) == (2, 8)
        assert [w["node"] for w in g["workers"]] == [1]
    head = second["group"]["head_argv"]
    assert head[second["host_at"]] == "<node address>"
    assert head[second["group"]["address_at"] - 1] == "--data-parallel-address"


def test_several_instances_on_one_node_share_it_behind_the_proxy():
    d = decision("-o", "execution.instances_per_host=2", "-o", "deployment.data_parallel_size=4")
    spec = d.host_vars[HOST]["evalprov_slurm_spec"]
    assert [(e["node"], e["instance"]["port"], e["instance"]["gpus"]) for e in
            spec["instances"]] == [(0, 8000, [0, 1, 2, 3]), (0, 8001, [4, 5, 6, 7])]
    assert "    server evalprov-vllm-1 127.0.0.1:8001" in spec["proxy"]["config"]


def test_num_nodes_splits_the_data_parallel_ranks_into_a_head_and_headless_workers():
    """The seed serves DP 8; over 2 nodes of 8 GPUs each node runs 4 ranks: the batch node
    the head (the API), the other `vllm serve --headless` from rank 4, started by srun."""
    d = decision("-o", "execution.num_nodes=2")
    spec = d.host_vars[HOST]["evalprov_slurm_spec"]
    (entry,) = spec["instances"]
    g, inst = entry["group"], entry["instance"]
    assert (g["nodes"], g["local"], g["rpc_port"], g["gpus"]) == (2, 4, 29550, [0, 1, 2, 3])
    assert g["head_argv"] == [*inst["argv"], "--data-parallel-size-local", "4",
                              "--data-parallel-address", "", "--data-parallel-rpc-port",
                              "29550"]
    assert g["head_argv"][g["address_at"] - 1] == "--data-parallel-address"
    (w,) = g["workers"]
    assert (w["node"], w["rank"]) == (1, 4)
    assert "--port" not in w["argv"] and "--host" not in w["argv"]
    assert w["argv"][:3] == inst["argv"][:3] and "--data-parallel-size=8" in w["argv"]
    assert w["argv"][w["argv"].index("--headless"):] == [
        "--headless", "--data-parallel-size-local", "4", "--data-parallel-start-rank", "4",
        "--data-parallel-address", "", "--data-parallel-rpc-port", "29550"]
    assert w["argv"][w["address_at"] - 1] == "--data-parallel-address"
    assert "--nodes=2" in d.host_vars[HOST]["evalprov_slurm_sbatch_argv"]
    assert decision().host_vars[HOST]["evalprov_slurm_spec"]["instances"][0]["group"] is None


def test_num_nodes_with_pipeline_stages_is_one_world_over_the_nodes():
    """DP 1, PP 2 over 2 nodes: vLLM's multi-node multiprocessing, the batch node node rank 0
    (the API), the other `vllm serve --headless --node-rank 1`, both dialling the head's
    master port (its address filled in on the node)."""
    d = decision("-o", "execution.num_nodes=2", "-o", "deployment.data_parallel_size=1",
                 "-o", "deployment.pipeline_parallel_size=2",
                 "-o", "deployment.tensor_parallel_size=4")
    (entry,) = d.host_vars[HOST]["evalprov_slurm_spec"]["instances"]
    g, inst = entry["group"], entry["instance"]
    assert (g["mode"], g["nodes"], g["rpc_port"], g["gpus"]) == (
        "pipeline-parallel", 2, 29501, [0, 1, 2, 3])
    assert g["head_argv"] == [*inst["argv"], "--nnodes", "2", "--node-rank", "0",
                              "--master-addr", "", "--master-port", "29501"]
    assert g["head_argv"][g["address_at"] - 1] == "--master-addr"
    (w,) = g["workers"]
    assert (w["node"], w["rank"], w["part"]) == (1, 1, "node rank 1")
    assert w["argv"][w["argv"].index("--headless"):] == [
        "--headless", "--nnodes", "2", "--node-rank", "1", "--master-addr", "",
        "--master-port", "29501"]
    assert "--port" not in w["argv"] and "--pipeline-parallel-size=2" in w["argv"]
    assert w["argv"][w["address_at"] - 1] == "--master-addr"


@pytest.mark.parametrize("overrides, words", [
    (("execution.num_nodes=3",), "make data_parallel_size or pipeline_parallel_size a "
     "multiple of num_nodes"),
    (("execution.num_nodes=2", "deployment.data_parallel_size=1",
      "deployment.pipeline_parallel_size=3"), "pipeline_parallel_size 3: evalprov spreads"),
    (("execution.num_nodes=2", "execution.gres=gpu:2"),
     "each node runs 4 data-parallel rank(s) of tensor x pipeline parallel 1x1 = 4 GPUs "
     "but has 2"),
    (("execution.num_nodes=2", "deployment.port=29550"), "deployment.port: 29550 is the "
     "data-parallel rpc port"),
    (("execution.num_nodes=2", "execution.instances_per_host=auto"),
     "an instance over several nodes is the only one on them"),
    (("execution.num_nodes=3", "execution.num_instances=2"),
     "execution.num_nodes: 3 is not a multiple of execution.num_instances 2"),
    (("execution.num_nodes=2", "execution.num_instances=2", "execution.instances_per_host=2"),
     "on Slurm each instance has its own node(s)"),
    (("execution.num_nodes=4", "execution.num_instances=2", "deployment.data_parallel_size=5"),
     "a multiple of num_nodes / num_instances (2)"),
])
def test_num_nodes_that_do_not_split_the_ranks_are_refused_in_one_line(overrides, words):
    with pytest.raises(PlanError) as err:
        decision(*[x for o in overrides for x in ("-o", o)])
    (line,) = err.value.lines
    assert words in line, line


@pytest.mark.parametrize("walltime, max_walltime, resumes", [
    ("01:00:00", "120:00:00", 50), ("02:00:00", "04:00:00", 1), ("02:00:00", "02:00:00", 0),
    ("00:01:00", "00:03:00", 2), ("1-00:00:00", "2-00:00:00", 1)])
def test_auto_resume_budget(walltime, max_walltime, resumes):
    exe = seed("-o", f"execution.walltime={walltime}",
               "-o", f"execution.max_walltime={max_walltime}").execution
    assert slurm.resumes(exe) == resumes


def test_finished_tasks_are_not_submitted_again():
    first = decision()
    prev = {}
    for a in first.to_run:
        from evalprov.decide import attempt_id

        prev[attempt_id(a.host, a.task, a.key)] = {
            "status": "succeeded" if a.task == "ifeval" else "failed", "host": a.host,
            "task": a.task, "key": a.key, "run_id": "r0", "attempt": 1, "error": None}
    again = decision(previous=prev)
    assert again.to_run == [] and again.host_vars[HOST]["evalprov_state"] == "converged"
    rerun = decision(previous=prev, rerun="failed")
    assert [a.task for a in rerun.to_run] == ["gpqa_diamond"]
    assert [t["name"] for t in rerun.host_vars[HOST]["evalprov_slurm_spec"]["tasks"]] == [
        "gpqa_diamond"]


def test_a_task_that_did_not_finish_says_how_the_job_ended():
    job = {"jobs": [{"id": "7", "state": "CANCELLED", "reason": ""}], "phase": "failed",
           "message": "signal SIGTERM: the job was cancelled"}
    recs = [{"task": "a", "status": "succeeded"}, {"task": "b", "status": "missing"},
            {"task": "c", "status": "failed", "error": "harness exited -9"}]
    slurm.explain_missing(recs, job)
    assert recs[0]["status"] == "succeeded"
    assert recs[1]["status"] == "failed"
    assert "job 7 CANCELLED: signal SIGTERM: the job was cancelled" in recs[1]["error"]
    assert recs[2]["error"].startswith("the Slurm job ended before the task finished")
    assert recs[2]["error"].endswith("harness exited -9")
    # a job that completed and a task that failed on its own: the task's own error only
    done = {"jobs": [{"id": "8", "state": "COMPLETED", "reason": ""}], "phase": "done",
            "message": ""}
    own = [{"task": "c", "status": "failed", "error": "harness exited 1"}]
    slurm.explain_missing(own, done)
    assert own[0]["error"] == "harness exited 1"
    # a job that failed because its tasks did, its successor cancelled before it ran: the
    # task's own error only
    failed = {"jobs": [{"id": "9", "state": "FAILED", "reason": "", "ran": True},
                       {"id": "10", "state": "CANCELLED", "reason": "", "ran": False}],
              "phase": "failed", "message": ""}
    own = [{"task": "c", "status": "failed", "error": "its server stopped serving: x"}]
    slurm.explain_missing(own, failed)
    assert own[0]["error"] == "its server stopped serving: x"


def test_walltime_forms():
    assert slurm.walltime_seconds("01:00:00") == 3600
    assert slurm.walltime_seconds("2-01:00:00") == 2 * 86400 + 3600
    assert slurm.walltime_seconds("30:00") == 1800


def test_a_key_the_user_gives_vllm_is_sent_by_the_harness_on_slurm_too():
    """deployment.env_vars.VLLM_API_KEY: the servers require it, so the tasks send it (the
    job's health checks read it from the deployment's secrets); one instance on loopback
    needs no key of evalprov's own."""
    from evalprov import apikey

    config = seed("deployment.env_vars.VLLM_API_KEY=host:EVALPROV_TEST_KEY")
    assert apikey.keyed(config) and not apikey.needed(config)
    d = decision("-o", "deployment.env_vars.VLLM_API_KEY=host:EVALPROV_TEST_KEY")
    for t in d.host_vars[HOST]["evalprov_slurm_spec"]["tasks"]:
        assert t["run_config"]["target"]["api_endpoint"]["api_key_name"] == "EVALPROV_API_KEY"
    assert not apikey.keyed(seed()) and not apikey.needed(seed())
    assert apikey.needed(seed("execution.num_nodes=2", "execution.num_instances=2"))


def test_nels_haproxy_example_serves_its_ranks_per_node_on_each_instance():
    """NEL's slurm_vllm_multinode_dp_haproxy.yaml writes data_parallel_size_local: 8 (and
    leaves data_parallel_size at 1): each of its two single-node instances serves DP 8."""
    path = REPO / "tests" / "data" / "nel_generations" / "multinode_haproxy_example.yaml"
    inputs = Inputs(config=load_config(path, []).config, hosts=(), run_id="r1", owner="own",
                    previous={}, rerun=None)
    d = decide_slurm(inputs, {})
    spec = d.host_vars["login.cluster.example"]["evalprov_slurm_spec"]
    assert [e["node"] for e in spec["instances"]] == [0, 1]
    for e in spec["instances"]:
        assert "--data-parallel-size=8" in e["instance"]["argv"]
        assert e["instance"]["gpus"] == list(range(8))
