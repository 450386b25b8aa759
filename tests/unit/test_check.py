"""check(plan, facts) and decide(inputs, facts): every decision made from a host's raw probe
facts, one test each. Does the host fit (GPUs, the inventory's count, docker and its NVIDIA
runtime, ports, checkpoint directories, disk), what the roles do on it (start, wait, remove,
pull, install, nothing: converged), and what decide adds on top (GPU counts from the probe,
the ledger's reuse, evaluate/destroy, each task's action, the answer to Ansible)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from evalprov.check import MIN_DISK_GIB, HostActions, HostFacts, check, pull_policy
from evalprov.decide import (
    Inputs,
    adapter_host,
    attempt_id,
    decide,
    decide_in_ansible,
    dump_inputs,
    role_vars,
    safe_decide,
    task_action,
)
from evalprov.errors import PlanError
from evalprov.plan import HostFacts as PlanHost
from evalprov.plan import Plan, plan

PINNED = "vllm/vllm-openai:v0.11.0"
IMAGE_ID = "sha256:" + "a" * 64
OLD_IMAGE_ID = "sha256:" + "b" * 64
DIGEST = "sha256:" + "c" * 64
NEW_DIGEST = "sha256:" + "d" * 64


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def gpu_plan(vllm_config):
    """gpu_plan(gpus=8, hosts=("h",), **vllm_user sections) -> a docker plan, image pinned
    (policy missing) unless the deployment says otherwise."""

    def make(gpus: int | None = 8, hosts: tuple[str, ...] = ("h",), **kw: Any) -> Plan:
        kw["deployment"] = {"image": PINNED, **(kw.get("deployment") or {})}
        return plan(vllm_config(**kw), [PlanHost(h, gpus) for h in hosts])

    return make


def raw_probe(gpus: int = 8, **over: Any) -> dict[str, Any]:
    """The probe module's return value for a healthy docker GPU host with the image present
    and no instance yet; keyword arguments replace top-level keys, docker_* keys of docker."""
    res: dict[str, Any] = {
        "changed": False, "evalprov_facts": True,
        "gpus": {"present": gpus > 0, "count": gpus, "error": "",
                 "devices": [{"index": i, "name": "H100", "memory_mib": 81559, "uuid": f"GPU-{i}"}
                             for i in range(gpus)]},
        "docker": {"present": True, "running": True, "nvidia_runtime": True,
                   "root_dir": "/var/lib/docker",
                   "image": {"id": IMAGE_ID, "digests": [DIGEST]}, "remote_digest": ""},
        "listening": [22], "dirs": {}, "disk_free_gib": {"/var/lib/docker": 500.0},
        "venvs": {}, "units": {}, "proxy": None, "haproxy": "/usr/sbin/haproxy",
    }
    for key, value in over.items():
        if key.startswith("docker_"):
            res["docker"][key[len("docker_"):]] = value
        else:
            res[key] = value
    return res


def units_of(p: Plan, host: str = "h", **over: Any) -> dict[str, dict[str, Any]]:
    """The probe's units for every planned instance of host, as the vllm role left them
    (running, serving, the plan's spec hash, the host's image); over replaces fields."""
    return {i.name: {"spec_hash": i.spec_hash, "port": str(i.port), "running": True,
                     "status": "running", "image_id": IMAGE_ID, "serving": True, **over}
            for i in p.host(host).instances}


def facts(gpus: int = 8, **over: Any) -> HostFacts:
    return HostFacts.from_probe(raw_probe(gpus, **over))


def served(p: Plan, host: str = "h", gpus: int = 8, **over: Any) -> HostFacts:
    """A host where every planned instance is up and serving, listening on its port."""
    hp = p.host(host)
    ports = [22, *(i.port for i in hp.instances)]
    if hp.proxy and "proxy" not in over:
        ports += [hp.proxy.port, hp.proxy.stats_port]
        over["proxy"] = {"spec_hash": hp.proxy.spec_hash, "port": hp.proxy.port,
                         "running": True, "serving": True}
    return facts(gpus, units=units_of(p, host), listening=ports, **over)


def no_tasks(p: Plan) -> Plan:
    return dataclasses.replace(p, hosts=tuple(dataclasses.replace(h, tasks=())
                                              for h in p.hosts))


def one(p: Plan, f: HostFacts, host: str = "h") -> tuple[tuple[str, ...], HostActions]:
    c = check(p, {host: f})
    return c.problems, c.hosts[host]


def raw(f: HostFacts) -> dict[str, Any]:
    """The probe's return value that parses to f (the parts check reads)."""
    return {"evalprov_facts": True,
            "gpus": {"count": f.gpu_count, "error": f.gpu_error},
            "docker": {"present": f.docker_present, "running": f.docker_running,
                       "nvidia_runtime": f.nvidia_runtime, "root_dir": f.docker_root,
                       "image": {"id": f.image_id, "digests": list(f.image_digests)},
                       "remote_digest": f.remote_digest},
            "listening": sorted(f.listening), "dirs": dict(f.dirs),
            "disk_free_gib": dict(f.disk_free_gib), "venvs": dict(f.venvs), "units": {}}


def decide_in_ansible_for(inputs: Inputs, probed: dict[str, tuple[dict[str, Any], bool]]
                          ) -> dict[str, Any]:
    import os
    import tempfile

    fd, path = tempfile.mkstemp()
    try:
        os.write(fd, dump_inputs(inputs))
        os.close(fd)
        return decide_in_ansible(path, probed)
    finally:
        os.unlink(path)


def inputs_for(config, hosts: list[PlanHost], **kw: Any) -> Inputs:
    return Inputs(config=config, hosts=tuple(hosts), run_id=kw.pop("run_id", "20260101-000000"),
                  owner=kw.pop("owner", "owner123"), **kw)


# --------------------------------------------------------------------------- the probe


def test_from_probe_parses_the_probe_modules_return_value():
    res = raw_probe(4, listening=[22, "8000"], dirs={"/m": True, "/x": False},
                    disk_free_gib={"/var/lib/docker": 12.5, "/gone": None},
                    venvs={"vllm": True, "harness": False},
                    docker_remote_digest=NEW_DIGEST,
                    units={"evalprov-vllm-0": {"spec_hash": "abc", "port": "8000",
                                               "running": True, "status": "running",
                                               "image_id": IMAGE_ID, "serving": False},
                           "evalprov-vllm-9": {"spec_hash": None, "port": None,
                                               "running": False, "status": "exited",
                                               "image_id": "", "serving": False}})
    f = HostFacts.from_probe(res, local=True)
    assert f.gpu_count == 4 and f.gpu_error == "" and f.local
    assert (f.docker_present, f.docker_running, f.nvidia_runtime) == (True, True, True)
    assert f.image_id == IMAGE_ID and f.image_digests == (DIGEST,)
    assert f.remote_digest == NEW_DIGEST
    assert f.listening == frozenset({22, 8000})
    assert f.dirs == {"/m": True, "/x": False}
    assert f.disk_free_gib == {"/var/lib/docker": 12.5, "/gone": None}
    assert f.venvs == {"vllm": True, "harness": False}
    u0, u9 = f.units["evalprov-vllm-0"], f.units["evalprov-vllm-9"]
    assert (u0.spec_hash, u0.port, u0.running, u0.serving) == ("abc", 8000, True, False)
    assert (u9.spec_hash, u9.port, u9.running) == ("", None, False)


def test_from_probe_of_a_bare_host_without_gpus_or_docker():
    f = HostFacts.from_probe({"gpus": {"present": False, "count": 0,
                                       "error": "nvidia-smi not found"},
                              "docker": {"present": False, "running": False}})
    assert f.gpu_count == 0 and f.gpu_error == "nvidia-smi not found"
    assert not f.docker_present and f.docker_root == "/var/lib/docker"
    assert f.image_id == "" and f.units == {} and f.listening == frozenset()


# --------------------------------------------------------------------------- does it fit


def test_a_fitting_host_has_no_problem(gpu_plan):
    p = gpu_plan(deployment={"tensor_parallel_size": 2},
                 execution={"instances_per_host": "auto"})
    assert check(p, {"h": facts(8)}).problems == ()


def test_too_few_gpus_is_a_problem_naming_host_count_and_fix(gpu_plan):
    p = gpu_plan(gpus=None, deployment={"tensor_parallel_size": 4},
                 execution={"instances_per_host": 2})
    (line,) = check(p, {"h": facts(4)}).problems
    assert line.startswith("host h: has 4 GPUs (nvidia-smi) but the plan needs 8;")
    assert "lower tensor/pipeline/data parallel sizes or instances_per_host" in line
    assert "drop the host" in line


def test_no_gpu_at_all_names_the_probes_error(gpu_plan):
    p = gpu_plan(gpus=None)
    res = raw_probe(0)
    res["gpus"] = {"present": False, "count": 0, "devices": [], "error": "nvidia-smi not found"}
    problems = check(p, {"h": HostFacts.from_probe(res)}).problems
    assert problems[0].startswith("host h: has 0 GPUs (nvidia-smi not found) but the plan "
                                  "needs 1")


def test_inventory_gpu_count_other_than_the_hosts_is_a_problem(gpu_plan):
    p = gpu_plan(gpus=4)  # the inventory says 4 (evalprov_gpu_count)
    (line,) = check(p, {"h": facts(8)}).problems
    assert line.startswith("host h: has 8 GPUs but the inventory says 4 (evalprov_gpu_count)")
    assert "fix the inventory or drop the variable" in line


def test_docker_missing_is_a_problem(gpu_plan):
    (line,) = check(gpu_plan(), {"h": facts(docker_present=False, docker_running=False)}
                    ).problems
    assert line == "host h: docker is not installed; install docker"


def test_docker_not_running_is_a_problem(gpu_plan):
    f = facts(docker_running=False, docker_nvidia_runtime=False)
    (line,) = check(gpu_plan(), {"h": f}).problems
    assert line == "host h: docker is installed but dockerd does not answer; start it"


def test_docker_without_the_nvidia_runtime_is_a_problem(gpu_plan):
    (line,) = check(gpu_plan(), {"h": facts(docker_nvidia_runtime=False)}).problems
    assert line.startswith("host h: docker has no NVIDIA runtime")
    assert "install nvidia-container-toolkit and restart dockerd" in line


def test_docker_is_not_needed_by_the_process_runtime(gpu_plan):
    p = gpu_plan(execution={"runtime": "process"})
    f = facts(docker_present=False, docker_running=False, docker_nvidia_runtime=False,
              venvs={"vllm": True, "harness": True})
    assert check(p, {"h": f}).problems == ()


def test_cpu_instances_need_no_nvidia_runtime(gpu_plan):
    p = gpu_plan(gpus=None, execution={"device": "cpu"})
    assert check(p, {"h": facts(0, docker_nvidia_runtime=False)}).problems == ()


def test_port_busy_by_something_else_is_a_problem(gpu_plan):
    p = gpu_plan(deployment={"tensor_parallel_size": 4}, execution={"instances_per_host": 2})
    (line,) = check(p, {"h": facts(listening=[22, 8001, 9000])}).problems
    assert line.startswith("host h: port(s) 8001 already in use by something evalprov did "
                           "not start")
    assert "deployment.port" in line


def test_port_busy_by_our_own_running_instance_is_no_problem(gpu_plan):
    p = gpu_plan()
    f = served(p)
    assert 8000 in f.listening and f.units["evalprov-vllm-0"].running
    assert check(p, {"h": f}).problems == ()
    # ours but stopped does not explain a listener: something else holds the port
    stopped = facts(units=units_of(p, running=False, serving=False), listening=[8000])
    assert "port(s) 8000 already in use" in check(p, {"h": stopped}).problems[0]


def test_checkpoint_dir_missing_is_a_problem(gpu_plan):
    p = gpu_plan(deployment={"hf_model_handle": None, "checkpoint_path": "/models/llama"})
    assert p.checkpoints == ("/models/llama",)
    (line,) = check(p, {"h": facts(dirs={"/models/llama": False})}).problems
    assert line.startswith("host h: checkpoint_path /models/llama is not a directory")
    assert check(p, {"h": facts()}).problems  # not reported at all: not a directory either
    assert check(p, {"h": facts(dirs={"/models/llama": True})}).problems == ()


def test_disk_low_is_a_problem_for_the_hf_cache_and_dockers_root(gpu_plan):
    p = gpu_plan(execution={"hf_cache_dir": "/data/hf"})
    assert p.disk_paths == ("/data/hf",)
    low = facts(disk_free_gib={"/data/hf": 0.4, "/var/lib/docker": 0.2})
    problems = check(p, {"h": low}).problems
    assert problems == (
        f"host h: /data/hf has 0.4 GiB free, less than {MIN_DISK_GIB} GiB; free space there",
        f"host h: /var/lib/docker has 0.2 GiB free, less than {MIN_DISK_GIB} GiB; free space "
        "there",
    )
    unknown = facts(disk_free_gib={"/data/hf": None, "/var/lib/docker": 50.0})
    assert check(p, {"h": unknown}).problems == ()


def test_every_problem_of_every_host_is_reported_at_once(gpu_plan):
    p = gpu_plan(gpus=None, hosts=("a", "b"))
    c = check(p, {"a": facts(0, docker_present=False, docker_running=False),
                  "b": facts(listening=[8000])})
    assert [line.split(":")[0] for line in c.problems] == ["host a", "host a", "host b"]
    assert set(c.hosts) == {"a", "b"}


def test_a_host_too_small_to_plan_does_not_hide_the_other_hosts_problems(vllm_config):
    """The plan cannot be made for h3 (2 GPUs, TP 4): every other host's problems (and
    h3's own besides its GPUs) are still named, one line each, and nothing is decided."""
    config = vllm_config(deployment={"image": PINNED, "tensor_parallel_size": 4})
    inputs = inputs_for(config, [PlanHost(h, None) for h in ("h1", "h2", "h3")])
    probed = {"h1": facts(8),
              "h2": facts(8, docker_running=False, docker_nvidia_runtime=False),
              "h3": facts(2, docker_present=False, docker_running=False)}
    with pytest.raises(PlanError) as err:
        decide(inputs, probed)
    assert err.value.hosts == ("h3",)
    d, problems = safe_decide(inputs, probed)
    assert d is None
    assert problems == [
        "host h3: has 2 GPUs but one instance needs 4 (tensor_parallel_size 4 x "
        "pipeline_parallel_size 1 x data_parallel_size 1); lower the parallel sizes to fit "
        "2 GPUs or drop the host from the inventory",
        "host h2: docker is installed but dockerd does not answer; start it",
        "host h3: docker is not installed; install docker",
    ]
    # the same through the action plugin's entry point: failed, every line, no host's vars
    out = decide_in_ansible_for(inputs, {h: (raw(f), False) for h, f in probed.items()})
    assert out["failed"] is True and out["hosts"] == {} and out["problems"] == problems


def test_a_plan_error_of_every_host_is_reported_as_it_is(vllm_config):
    config = vllm_config(deployment={"image": PINNED, "tensor_parallel_size": 4})
    inputs = inputs_for(config, [PlanHost("a", None), PlanHost("b", None)])
    d, problems = safe_decide(inputs, {"a": facts(2), "b": facts(1, docker_present=False)})
    assert d is None
    assert [p.split(":")[0] for p in problems] == ["host a", "host b", "host b"]
    assert problems[2] == "host b: docker is not installed; install docker"


def test_a_plan_error_not_of_a_host_is_reported_alone(vllm_config):
    config = vllm_config(deployment={"image": PINNED},
                         tasks=[{"name": "ifeval", "nemo_evaluator_config": {
                             "config": {"params": {"bogus": 1}}}}])
    inputs = inputs_for(config, [PlanHost("a", None)])
    d, problems = safe_decide(inputs, {"a": facts(8, docker_present=False)})
    assert d is None
    assert len(problems) == 1 and "config.params.bogus is not a harness parameter" in problems[0]


def _none_config(make_config, runtime: str = "docker"):
    return make_config({
        "defaults": [{"execution": "baremetal"}, {"deployment": "none"}, "_self_"],
        "execution": {"output_dir": "/results", "runtime": runtime},
        "target": {"api_endpoint": {"url": "http://10.0.0.5:8000/v1/chat/completions",
                                    "model_id": "m"}},
        "evaluation": {"tasks": [{"name": "ifeval"}, {"name": "gpqa_diamond"}]},
    })


@pytest.mark.parametrize(("over", "line"), [
    ({"docker_present": False, "docker_running": False},
     "host a: docker is not installed (its evaluation tasks run in containers); install "
     "docker"),
    ({"docker_running": False},
     "host a: docker is installed but dockerd does not answer (its evaluation tasks run in "
     "containers); start it"),
])
def test_docker_is_checked_on_a_host_that_only_runs_tasks(make_config, over, line):
    config = _none_config(make_config)
    p = plan(config, [PlanHost("a", 0), PlanHost("b", 0)])
    assert p.host("a").tasks and not p.host("a").instances
    f = facts(0, docker_nvidia_runtime=False, **over)
    assert check(p, {"a": f, "b": facts(0)}).problems == (line,)
    # decide refuses the run before any task starts
    d = decide(inputs_for(config, [PlanHost("a", 0), PlanHost("b", 0)]),
               {"a": f, "b": facts(0)})
    assert d.problems == (line,)


def test_docker_on_a_task_only_host_is_not_needed_without_tasks_or_by_process(make_config):
    config = _none_config(make_config)
    p = plan(config, [PlanHost("a", 0)])
    no_docker = facts(0, docker_present=False, docker_running=False)
    assert check(no_tasks(p), {"a": no_docker}).problems == ()
    proc = plan(_none_config(make_config, "process"), [PlanHost("a", 0)])
    assert check(proc, {"a": dataclasses.replace(no_docker, venvs={"harness": True})}
                 ).problems == ()


def test_hosts_without_facts_are_left_out(gpu_plan):
    c = check(gpu_plan(hosts=("a", "b")), {"a": facts()})
    assert set(c.hosts) == {"a"} and c.problems == ()


# --------------------------------------------------------------------------- actions


def test_converged_host_has_nothing_to_do(gpu_plan, vllm_config):
    p = no_tasks(gpu_plan(deployment={"tensor_parallel_size": 2},
                          execution={"instances_per_host": "auto"}))
    problems, a = one(p, served(p))
    assert problems == ()
    assert a.converged
    assert (a.start, a.remove, a.wait, a.pull, a.reasons) == ((), (), (), False, ())
    inputs = inputs_for(vllm_config(), [PlanHost("h", 8)])
    rv = role_vars(p, a, inputs, served(p))
    assert rv["evalprov_state"] == "converged"
    assert rv["evalprov_vllm_start"] == [] and rv["evalprov_health_wait"] == []
    assert rv["evalprov_image_pull"] is False and rv["evalprov_eval_tasks"] == []


def test_tasks_to_run_keep_a_host_from_being_converged(gpu_plan):
    p = gpu_plan(tasks=[{"name": "ifeval"}, {"name": "mmlu"}])
    _, a = one(p, served(p))
    assert a.tasks == 2 and not a.converged
    assert a.reasons == ("run task ifeval", "run task mmlu")


def test_missing_instance_is_started_and_waited_for(gpu_plan):
    p = no_tasks(gpu_plan())
    _, a = one(p, facts())
    (inst,) = p.instances
    assert a.start == (inst,) and a.wait == (inst,)
    assert a.reasons == ("recreate evalprov-vllm-0: not there",)


def test_spec_hash_changed_recreates_and_waits_with_the_reason(gpu_plan):
    p = no_tasks(gpu_plan())
    (inst,) = p.instances
    f = facts(units=units_of(p, spec_hash="0123456789abcdef"), listening=[8000])
    problems, a = one(p, f)
    assert problems == ()
    assert a.start == (inst,) and a.wait == (inst,) and not a.remove
    assert a.reasons == (f"recreate {inst.name}: spec changed (0123456789abcdef -> "
                         f"{inst.spec_hash})",)


def test_stopped_instance_is_started_again(gpu_plan):
    p = no_tasks(gpu_plan())
    _, a = one(p, facts(units=units_of(p, running=False, serving=False)))
    assert [i.name for i in a.start] == ["evalprov-vllm-0"]
    assert a.reasons == ("recreate evalprov-vllm-0: not running",)


def test_running_but_not_serving_is_waited_for_only(gpu_plan):
    p = no_tasks(gpu_plan())
    f = facts(units=units_of(p, serving=False), listening=[8000])
    problems, a = one(p, f)
    assert problems == ()
    assert a.start == () and [i.name for i in a.wait] == ["evalprov-vllm-0"]
    assert a.reasons == ("wait for evalprov-vllm-0: running but not serving yet",)
    assert not a.converged


def test_unit_not_in_the_plan_is_removed(gpu_plan):
    p = no_tasks(gpu_plan())
    units = {**units_of(p), "evalprov-vllm-3": {"spec_hash": "x", "port": "8003",
                                                "running": True, "serving": True,
                                                "image_id": IMAGE_ID}}
    problems, a = one(p, facts(units=units, listening=[8000, 8003]))
    assert problems == ()  # 8003 is held by our own instance
    assert a.remove == ("evalprov-vllm-3",) and a.start == () and a.wait == ()
    assert a.reasons == ("remove evalprov-vllm-3: not in the plan",)


def test_image_absent_is_pulled(gpu_plan):
    p = no_tasks(gpu_plan())
    _, a = one(p, facts(docker_image={"id": "", "digests": []}))
    assert a.pull
    assert a.reasons[0] == f"pull {PINNED} (not on the host)"
    assert [i.name for i in a.start] == ["evalprov-vllm-0"]


def test_no_instances_no_pull(vllm_config, make_config):
    user = {"defaults": [{"execution": "baremetal"}, {"deployment": "none"}],
            "execution": {"output_dir": "/results"},
            "target": {"api_endpoint": {"url": "http://api:9000/v1/chat/completions",
                                        "model_id": "m"}},
            "evaluation": {"tasks": [{"name": "ifeval"}]}}
    p = plan(make_config(user), [PlanHost("h")])
    _, a = one(p, facts(docker_image={"id": "", "digests": []}))
    assert not a.pull and a.start == ()


@pytest.mark.parametrize(("image", "policy"), [
    ("vllm/vllm-openai:latest", "always"),
    ("vllm/vllm-openai", "always"),
    ("registry.local:5000/vllm/vllm-openai", "always"),
    ("registry.local:5000/vllm/vllm-openai:latest", "always"),
    ("vllm/vllm-openai:v0.11.0", "missing"),
    ("registry.local:5000/vllm/vllm-openai:v0.11.0", "missing"),
    (f"vllm/vllm-openai@{DIGEST}", "missing"),
    (f"vllm/vllm-openai:latest@{DIGEST}", "missing"),
])
def test_pull_policy_follows_the_tag(image, policy, gpu_plan):
    assert pull_policy(gpu_plan(deployment={"image": image})) == policy


@pytest.mark.parametrize(("image", "explicit"), [
    ("vllm/vllm-openai:latest", "missing"), ("vllm/vllm-openai:v0.11.0", "always"),
])
def test_an_explicit_pull_policy_wins_over_the_tag(image, explicit, gpu_plan):
    p = dataclasses.replace(gpu_plan(deployment={"image": image}), image_pull_policy=explicit)
    assert pull_policy(p) == explicit


def test_policy_missing_with_the_image_present_does_not_pull(gpu_plan):
    p = no_tasks(gpu_plan())
    _, a = one(p, served(p, docker_remote_digest=NEW_DIGEST))
    assert not a.pull and a.converged


def test_policy_always_with_the_registry_digest_present_locally_does_not_pull(gpu_plan):
    p = no_tasks(gpu_plan(deployment={"image": "vllm/vllm-openai:latest"}))
    _, a = one(p, served(p, docker_remote_digest=DIGEST))
    assert not a.pull and a.converged


def test_policy_always_with_a_new_registry_digest_pulls_and_recreates_every_instance(
        gpu_plan):
    p = no_tasks(gpu_plan(deployment={"image": "vllm/vllm-openai:latest",
                                      "tensor_parallel_size": 4},
                          execution={"instances_per_host": "auto"}))
    _, a = one(p, served(p, docker_remote_digest=NEW_DIGEST))
    assert a.pull
    assert [i.name for i in a.start] == ["evalprov-vllm-0", "evalprov-vllm-1"]
    assert a.wait == a.start
    assert a.reasons[0] == (f"pull vllm/vllm-openai:latest (image_pull_policy always; "
                            f"registry digest {NEW_DIGEST})")
    assert all("image vllm/vllm-openai:latest moved to" in r for r in a.reasons[1:]
               if r.startswith("recreate"))


def test_policy_always_with_the_registry_digest_unknown_pulls(gpu_plan):
    p = no_tasks(gpu_plan(deployment={"image": "vllm/vllm-openai:latest"}))
    _, a = one(p, served(p, docker_remote_digest=""))
    assert a.pull
    assert "registry digest unknown" in a.reasons[0]
    assert a.reasons[1] == "recreate evalprov-vllm-0: image pulled again (its digest decides)"


def test_container_on_an_older_image_than_the_hosts_is_recreated(gpu_plan):
    p = no_tasks(gpu_plan())
    f = facts(units=units_of(p, image_id=OLD_IMAGE_ID), listening=[8000])
    _, a = one(p, f)
    assert not a.pull
    assert [i.name for i in a.start] == ["evalprov-vllm-0"]
    assert a.reasons == (f"recreate evalprov-vllm-0: runs an older image "
                         f"({OLD_IMAGE_ID[:19]}, host has {IMAGE_ID[:19]})",)


def test_process_runtime_installs_missing_venvs(gpu_plan):
    p = gpu_plan(execution={"runtime": "process"})
    assert p.image is None
    f = facts(docker_present=False, docker_running=False, venvs={"vllm": False})
    problems, a = one(p, f)
    assert problems == ()
    assert a.install_vllm and a.install_harness and not a.pull
    assert f"install {p.vllm_package} into {p.vllm_venv}" in a.reasons
    assert f"install the harness into {p.harness_venv}" in a.reasons
    _, ready = one(p, facts(venvs={"vllm": True, "harness": True}))
    assert not ready.install_vllm and not ready.install_harness
    _, idle = one(no_tasks(p), facts(venvs={"vllm": True}))
    assert not idle.install_harness  # no task on the host: no harness needed


# --------------------------------------------------------------------------- decide


def test_decide_plans_instances_per_host_auto_from_the_probes_gpu_count(vllm_config):
    config = vllm_config(deployment={"tensor_parallel_size": 2, "image": PINNED},
                         execution={"instances_per_host": "auto"})
    d = decide(inputs_for(config, [PlanHost("h", None)]), {"h": facts(8)})
    assert [i.gpus for i in d.plan.instances] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [i.port for i in d.plan.instances] == [8000, 8001, 8002, 8003]
    assert d.plan.host("h").gpus_total == 8
    assert d.problems == ()
    assert [i["name"] for i in d.host_vars["h"]["evalprov_vllm_start"]] == [
        f"evalprov-vllm-{k}" for k in range(4)]


def test_decide_falls_back_to_an_earlier_runs_gpu_count(vllm_config):
    config = vllm_config(deployment={"tensor_parallel_size": 2, "image": PINNED},
                         execution={"instances_per_host": "auto"})
    d = decide(inputs_for(config, [PlanHost("h", None)], cached_gpus={"h": 4}), {})
    assert len(d.plan.instances) == 2 and d.host_vars == {}


def _rows(d, status: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Ledger rows of an earlier run that ran d's tasks with these outcomes."""
    out = {}
    for a in d.to_run:
        if a.task in status:
            out[attempt_id(a.host, a.task, a.key)] = {
                "host": a.host, "task": a.task, "key": a.key, "status": status[a.task],
                "run_id": "20251231-000000", "attempt": 1, "seconds": 12.0, "samples": 5,
                "result_dir": f"/r/{a.task}", "metric": "acc.strict" if status[a.task] ==
                "succeeded" else None, "score": 0.5, "error": "boom"
                if status[a.task] == "failed" else None}
    return out


@pytest.fixture
def three_tasks(vllm_config):
    config = vllm_config(deployment={"image": PINNED},
                         tasks=[{"name": "ifeval"}, {"name": "mmlu"}, {"name": "gpqa_diamond"}])
    first = decide(inputs_for(config, [PlanHost("h", 8)]), {"h": facts()})
    assert [a.task for a in first.to_run] == ["ifeval", "mmlu", "gpqa_diamond"]
    previous = _rows(first, {"ifeval": "succeeded", "mmlu": "failed"})
    return lambda **kw: decide(inputs_for(config, [PlanHost("h", 8)], previous=previous, **kw),
                               {"h": facts()})


def test_ledger_reuses_succeeded_and_failed_tasks_by_default(three_tasks):
    d = three_tasks()
    assert [a.task for a in d.to_run] == ["gpqa_diamond"]
    assert [(r["task"], r["status"]) for r in d.reused] == [("ifeval", "succeeded"),
                                                            ("mmlu", "failed")]
    ok, failed = d.reused
    assert ok["reused_from"] == "20251231-000000"
    assert ok["primary"] == {"metric": "acc", "name": "strict", "score": 0.5}
    assert failed["error"].startswith("failed in run 20251231-000000 (attempt 1): boom")
    assert "--rerun failed" in failed["error"]
    assert [t["name"] for t in d.host_vars["h"]["evalprov_eval_tasks"]] == ["gpqa_diamond"]


def test_rerun_failed_runs_the_failed_and_the_unfinished(three_tasks):
    d = three_tasks(rerun="failed")
    assert [a.task for a in d.to_run] == ["mmlu", "gpqa_diamond"]
    assert [r["task"] for r in d.reused] == ["ifeval"]


def test_rerun_all_runs_everything(three_tasks):
    d = three_tasks(rerun="all")
    assert [a.task for a in d.to_run] == ["ifeval", "mmlu", "gpqa_diamond"]
    assert d.reused == []


def test_a_changed_task_is_not_reused(three_tasks, vllm_config):
    d = three_tasks()
    changed = vllm_config(deployment={"image": PINNED, "extra_args": "--max-model-len 4096"},
                          tasks=[{"name": "ifeval"}, {"name": "mmlu"},
                                 {"name": "gpqa_diamond"}])
    again = decide(inputs_for(changed, [PlanHost("h", 8)],
                              previous=_rows(d, {"gpqa_diamond": "succeeded"})),
                   {"h": facts()})
    assert [a.task for a in again.to_run] == ["ifeval", "mmlu", "gpqa_diamond"]


def test_evaluate_false_drops_every_task(vllm_config):
    config = vllm_config(deployment={"image": PINNED}, tasks=[{"name": "ifeval"}])
    d = decide(inputs_for(config, [PlanHost("h", 8)], evaluate=False), {"h": facts()})
    assert d.to_run == [] and d.reused == [] and d.plan.task_runs == []
    assert d.host_vars["h"]["evalprov_eval_tasks"] == []
    assert d.checked.hosts["h"].tasks == 0


def test_evaluate_false_on_a_served_host_is_converged(vllm_config):
    config = vllm_config(deployment={"image": PINNED})
    p = plan(config, [PlanHost("h", 8)])
    d = decide(inputs_for(config, [PlanHost("h", 8)], evaluate=False), {"h": served(p)})
    assert d.host_vars["h"]["evalprov_state"] == "converged"
    assert d.host_vars["h"]["evalprov_actions"] == []


def test_destroy_removes_every_unit_found(vllm_config):
    config = vllm_config(deployment={"image": PINNED})
    p = plan(config, [PlanHost("a", 8)])
    units = {**units_of(p, "a"), "evalprov-vllm-7": {"spec_hash": "x", "running": False}}
    d = decide(inputs_for(config, [PlanHost("a", 8), PlanHost("b", 8)], destroy=True),
               {"a": facts(units=units), "b": facts()})
    assert d.problems == () and d.to_run == []
    assert d.host_vars["a"] == {"evalprov_state": "pending",
                                "evalprov_actions": ["remove evalprov-vllm-0",
                                                     "remove evalprov-vllm-7"],
                                "evalprov_vllm_remove": ["evalprov-vllm-0", "evalprov-vllm-7"],
                                "evalprov_vllm_proxy_remove": False}
    assert d.host_vars["b"] == {"evalprov_state": "converged", "evalprov_actions": [],
                                "evalprov_vllm_remove": [], "evalprov_vllm_proxy_remove": False}


def test_role_vars_carry_the_actions_in_the_roles_form(vllm_config):
    config = vllm_config(deployment={"image": PINNED})
    d = decide(inputs_for(config, [PlanHost("h", 8)]),
               {"h": facts(docker_image={"id": "", "digests": []})})
    rv = d.host_vars["h"]
    (inst,) = d.plan.instances
    assert rv["evalprov_state"] == "pending" and rv["evalprov_image_pull"] is True
    assert rv["evalprov_vllm_start"][0]["name"] == inst.name
    assert rv["evalprov_vllm_start"][0]["entrypoint"] + rv["evalprov_vllm_start"][0][
        "command"] == list(inst.argv)
    assert rv["evalprov_health_wait"] == [{"name": inst.name, "port": inst.port}]
    assert rv["evalprov_vllm_remove"] == [] and rv["evalprov_vllm_install"] is False
    assert rv["evalprov_eval_run_dir"] == "/var/lib/evalprov/runs/20260101-000000"
    assert rv["evalprov_actions"][0] == f"pull {PINNED} (not on the host)"


# --------------------------------------------------------------------------- task_action


@pytest.fixture
def two_task_host(vllm_config):
    def make(**execution: Any):
        config = vllm_config(deployment={"image": PINNED}, execution=execution,
                             tasks=[{"name": "ifeval"}, {"name": "simple_evals.mmlu_pro"}])
        inputs = inputs_for(config, [PlanHost("h", 8)], run_id="20260102-030405",
                            owner="cafe01")
        d = decide(inputs, {"h": facts()})
        return d, inputs, d.host_vars["h"]["evalprov_eval_tasks"]

    return make


def test_task_action_names_the_container_after_the_slug_and_run(two_task_host):
    d, inputs, (a, b) = two_task_host()
    assert [t.slug for t in d.plan.task_runs] == ["ifeval", "simple_evals.mmlu_pro"]
    assert a["slug"] == "ifeval" and b["slug"] == "simple_evals.mmlu_pro"
    for t in (a, b):
        assert t["slug"] in t["container_name"] and inputs.run_id in t["container_name"]
        assert t["container_name"] == f"evalprov-eval-{t['slug']}-{inputs.run_id}"
        assert t["labels"] == {"evalprov.managed": "eval", "evalprov.owner": "cafe01",
                               "evalprov.run": "20260102-030405"}
    assert a["container_name"] != b["container_name"]


def test_task_action_slug_replaces_what_a_path_cannot_hold(vllm_config):
    from evalprov.plan import slug

    assert slug("lm-evaluation-harness.ifeval") == "lm-evaluation-harness.ifeval"
    assert slug("a/b c:d") == "a_b_c_d"


def test_task_action_gives_each_task_on_a_host_its_own_adapter_address(two_task_host):
    _, _, tasks = two_task_host()
    hosts = [t["env"]["ADAPTER_HOST"] for t in tasks]
    assert hosts == ["127.0.1.1", "127.0.1.2"]
    many = {adapter_host(k) for k in range(1000)}
    assert len(many) == 1000 and all(h.startswith("127.") for h in many)


def test_task_action_docker_output_dir_is_in_the_container(two_task_host):
    _, inputs, (a, _) = two_task_host()
    assert a["run_config"]["config"]["output_dir"] == "/work/results"
    assert a["dir"] == f"/var/lib/evalprov/runs/{inputs.run_id}/ifeval"
    assert a["argv"] == ["nemo-evaluator", "run_eval", "--run_config", "/work/run_config.yml"]
    assert a["env"]["HF_HUB_OFFLINE"] == "1" and a["path_prepend"] == ""


def test_task_action_process_output_dir_is_under_the_work_dir(two_task_host):
    _, inputs, (a, b) = two_task_host(runtime="process", work_dir="/srv/ep")
    for t in (a, b):
        base = f"/srv/ep/runs/{inputs.run_id}/{t['slug']}"
        assert t["dir"] == base
        assert t["run_config"]["config"]["output_dir"] == f"{base}/results"
        assert t["argv"] == ["/opt/evalprov/harness-venv/bin/nemo-evaluator", "run_eval",
                             "--run_config", f"{base}/run_config.yml"]
        assert t["env"]["VIRTUAL_ENV"] == "/opt/evalprov/harness-venv"
        assert t["path_prepend"] == "/opt/evalprov/harness-venv/bin"


def test_task_action_leaves_the_plans_run_config_alone(two_task_host):
    d, _, (a, _) = two_task_host(runtime="process")
    assert a["run_config"]["config"]["output_dir"] != "/work/results"
    assert d.plan.task_runs[0].run_config["config"]["output_dir"] == "/work/results"


def test_task_action_sample_data_local_vs_remote(vllm_config):
    config = vllm_config(deployment={"image": PINNED}, execution={"sample_data": True,
                                                                  "runtime": "process"})
    inputs = inputs_for(config, [PlanHost("h", 8)], samples_src="/ctl/samples")
    p = plan(config, [PlanHost("h", 8)])
    t = p.task_runs[0]
    local = task_action(p, t, 0, inputs, HostFacts(8, local=True))
    remote = task_action(p, t, 0, inputs, HostFacts(8))
    assert local["cwd"] == "/ctl/samples" and local["env"]["NLTK_DATA"] == "/ctl/samples/nltk_data"
    assert remote["cwd"] == "/var/lib/evalprov/samples"
    rv = role_vars(p, check(p, {"h": HostFacts(8)}).hosts["h"], inputs, HostFacts(8))
    assert rv["evalprov_eval_ship_samples"] is True
    rv = role_vars(p, check(p, {"h": HostFacts(8, local=True)}).hosts["h"], inputs,
                   HostFacts(8, local=True))
    assert rv["evalprov_eval_ship_samples"] is False


# --------------------------------------------------------------------------- to Ansible


def test_decide_in_ansible_fails_with_every_problem(vllm_config, tmp_path):
    config = vllm_config(deployment={"image": PINNED})
    path = tmp_path / "inputs"
    path.write_bytes(dump_inputs(inputs_for(config, [PlanHost("a", None), PlanHost("b", None)])))
    probed = {"a": (raw_probe(8, docker_present=False, docker_running=False), False),
              "b": (raw_probe(8, listening=[8000], docker_nvidia_runtime=False), True)}
    out = decide_in_ansible(str(path), probed)
    assert out["failed"] is True
    assert out["local"] == {"a": False, "b": True}
    problems = out["problems"]
    assert len(problems) == 3
    assert problems[0] == "host a: docker is not installed; install docker"
    assert any(p.startswith("host b: docker has no NVIDIA runtime") for p in problems)
    assert any(p.startswith("host b: port(s) 8000 already in use") for p in problems)
    assert out["msg"] == "; ".join(problems)


def test_decide_in_ansible_turns_a_plan_that_cannot_be_made_into_problems(vllm_config,
                                                                         tmp_path):
    config = vllm_config(deployment={"image": PINNED}, execution={"instances_per_host": 4})
    path = tmp_path / "inputs"
    path.write_bytes(dump_inputs(inputs_for(config, [PlanHost("a", None)])))
    out = decide_in_ansible(str(path), {"a": (raw_probe(2), False)})
    assert out["failed"] is True and out["hosts"] == {}
    assert out["problems"][0].startswith("host a: has 2 GPUs but 4 instances")


def test_decide_in_ansible_hands_every_host_its_variables(vllm_config, tmp_path):
    config = vllm_config(deployment={"image": PINNED})
    path = tmp_path / "inputs"
    path.write_bytes(dump_inputs(inputs_for(config, [PlanHost("a", None)])))
    out = decide_in_ansible(str(path), {"a": (raw_probe(8), False)})
    assert "failed" not in out and out["problems"] == []
    assert out["evalprov_decision"] is True
    assert out["hosts"]["a"]["evalprov_state"] == "pending"
    assert [i["name"] for i in out["hosts"]["a"]["evalprov_vllm_start"]] == ["evalprov-vllm-0"]


def test_load_inputs_refuses_anything_else(tmp_path):
    import pickle

    from evalprov.decide import load_inputs

    path = tmp_path / "inputs"
    path.write_bytes(pickle.dumps({"not": "inputs"}))
    with pytest.raises(TypeError, match="not evalprov decide inputs"):
        load_inputs(str(path))


def test_execution_image_pull_policy_reaches_the_plan_and_the_probe(gpu_plan):
    from evalprov.inventory import common_vars

    p = gpu_plan(deployment={"image": "vllm/vllm-openai:v0.11.0"},
                 execution={"image_pull_policy": "always"})
    assert p.image_pull_policy == "always" and pull_policy(p) == "always"
    assert common_vars(p)["evalprov_preflight_remote_digest"] is True
    pinned = gpu_plan(deployment={"image": "vllm/vllm-openai:v0.11.0"})
    assert common_vars(pinned)["evalprov_preflight_remote_digest"] is False
