"""Deployments larger than one host: node groups of equal GPU counts, their ranks, addresses,
ports and exact argv for vLLM's multi-node data parallel and for TP x PP over hosts (vLLM's
multi-node multiprocessing: --nnodes, --node-rank, --master-addr); the refusals; hosts left
over; tasks on heads only; what `evalprov plan` prints and the inventory variables the roles
get."""

from __future__ import annotations

import dataclasses

import pytest

from evalprov.errors import PlanError
from evalprov.inventory import render
from evalprov.plan import DP_RPC_PORT, MASTER_PORT, HostFacts, plan
from evalprov.show import plan_text

TASKS = [{"name": "ifeval"}, {"name": "gpqa_diamond"}, {"name": "mmlu"}]
MODEL = ("vllm", "serve", "org/model")
TAIL = ("--trust-remote-code", "--served-model-name", "model", "--gpu-memory-utilization",
        "0.95", "--max-model-len", "4096")


@pytest.fixture
def make(vllm_config):
    def make(hosts, tp=1, pp=1, dp=1, extra_args="--max-model-len 4096", deployment=None,
             **execution):
        config = vllm_config(tasks=TASKS, deployment={
            "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
            "data_parallel_size": dp, "extra_args": extra_args, **(deployment or {})},
            execution=execution)
        return plan(config, [HostFacts(n, g, a) for n, g, a in hosts])
    return make


def sizes(tp, pp, dp):
    return (f"--tensor-parallel-size={tp}", f"--pipeline-parallel-size={pp}",
            f"--data-parallel-size={dp}")


def refused(make, hosts, **kw) -> list[str]:
    with pytest.raises(PlanError) as err:
        make(hosts, **kw)
    return err.value.lines


# --------------------------------------------------------------------------- data parallel


def test_data_parallel_over_two_hosts_is_a_head_and_a_headless_worker(make):
    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    (g,) = p.groups
    assert (g.name, g.mode, g.hosts, g.addresses, g.gpus_per_host, g.local, g.port) == (
        "group-0", "data-parallel", ("h1", "h2"), ("10.1.0.1", "10.1.0.2"), 4, 2, DP_RPC_PORT)
    (head,), (worker,) = p.host("h1").instances, p.host("h2").instances
    dp = ("--data-parallel-address", "10.1.0.1", "--data-parallel-rpc-port", "29550")
    # vLLM's data parallel deployment docs: the head serves the API with its local ranks...
    assert head.argv == (*MODEL, *sizes(2, 1, 4), "--port", "8000", "--host", "127.0.0.1",
                         *TAIL, "--data-parallel-size-local", "2", *dp)
    # ...each worker runs its own ranks headless (no API: neither --port nor --host)
    assert worker.argv == (*MODEL, *sizes(2, 1, 4), *TAIL, "--headless",
                           "--data-parallel-size-local", "2", "--data-parallel-start-rank",
                           "2", *dp)
    for inst in (head, worker):  # one --data-parallel-size, the total
        assert [a for a in inst.argv if a.startswith("--data-parallel-size")] == [
            "--data-parallel-size=4", "--data-parallel-size-local"]
    assert [(i.role, i.rank, i.port, i.gpus, i.nodes, i.head_address, i.rpc_port)
            for i in (head, worker)] == [
        ("head", 0, 8000, (0, 1, 2, 3), ("h1", "h2"), "10.1.0.1", DP_RPC_PORT),
        ("worker", 2, 0, (0, 1, 2, 3), ("h1", "h2"), "10.1.0.1", DP_RPC_PORT)]
    assert (head.serves, worker.serves) == (True, False)
    # every task on the head, none on the worker
    assert [t.host for t in p.task_runs] == ["h1", "h1", "h1"]
    assert {t.url for t in p.task_runs} == {"http://127.0.0.1:8000/v1/chat/completions",
                                            "http://127.0.0.1:8000/v1/completions"}
    assert p.host("h2").tasks == ()


def test_four_hosts_make_two_groups_and_tasks_shard_over_their_heads(make):
    p = make([(f"h{i}", 8, None) for i in range(4)], tp=4, dp=4)
    assert [g.hosts for g in p.groups] == [("h0", "h1"), ("h2", "h3")]
    assert [g.addresses for g in p.groups] == [("h0", "h1"), ("h2", "h3")]  # no ansible_host
    assert {t.name: t.host for t in p.task_runs} == {"ifeval": "h0", "gpqa_diamond": "h2",
                                                      "mmlu": "h0"}
    assert [(i.group, i.role, i.rank, i.head_address) for i in p.instances] == [
        ("group-0", "head", 0, "h0"), ("group-0", "worker", 2, "h0"),
        ("group-1", "head", 0, "h2"), ("group-1", "worker", 2, "h2")]


def test_ranks_follow_inventory_order_over_several_workers(make):
    p = make([("a", 2, "10.0.0.1"), ("b", 2, "10.0.0.2"), ("c", 2, "10.0.0.3")], tp=1, dp=6)
    (g,) = p.groups
    assert (g.hosts, g.local) == (("a", "b", "c"), 2)
    starts = [i.argv[i.argv.index("--data-parallel-start-rank") + 1]
              if "--headless" in i.argv else None for i in p.instances]
    assert starts == [None, "2", "4"]
    assert [i.rank for i in p.instances] == [0, 2, 4]
    assert all(i.gpus == (0, 1) for i in p.instances)


# --------------------------------------------------------------------------- pipeline


def nodes(n: int, rank: int, head: str) -> tuple[str, ...]:
    return ("--nnodes", str(n), "--node-rank", str(rank), "--master-addr", head,
            "--master-port", str(MASTER_PORT))


def test_tp_inside_a_host_pp_across_hosts_is_one_multinode_world(make):
    p = make([("h1", 8, "10.2.0.1"), ("h2", 8, "10.2.0.2")], tp=8, pp=2)
    (g,) = p.groups
    assert (g.mode, g.hosts, g.port, g.local) == (
        "pipeline-parallel", ("h1", "h2"), MASTER_PORT, 0)
    (head,), (worker,) = p.host("h1").instances, p.host("h2").instances
    # vLLM's multi-node multiprocessing: every node runs vllm serve with the whole world's
    # sizes and its --node-rank; the head (rank 0) serves the API, the others are headless
    assert head.argv == (*MODEL, *sizes(8, 2, 1), "--port", "8000", "--host", "127.0.0.1",
                         *TAIL, *nodes(2, 0, "10.2.0.1"))
    assert worker.argv == (*MODEL, *sizes(8, 2, 1), *TAIL, "--headless",
                           *nodes(2, 1, "10.2.0.1"))
    assert "--port" not in worker.argv and "--distributed-executor-backend" not in head.argv
    assert [(i.role, i.rank, i.port, i.gpus, i.rpc_port) for i in (head, worker)] == [
        ("head", 0, 8000, tuple(range(8)), MASTER_PORT), ("worker", 1, 0, tuple(range(8)),
                                                           MASTER_PORT)]
    # each member tells vLLM its own address (vLLM's multi-node docs: VLLM_HOST_IP per node)
    assert dict(head.env)["VLLM_HOST_IP"] == "10.2.0.1"
    assert dict(worker.env)["VLLM_HOST_IP"] == "10.2.0.2"
    assert [t.host for t in p.task_runs] == ["h1", "h1", "h1"]


def test_a_pipeline_over_three_hosts(make):
    p = make([("a", 4, "10.3.0.1"), ("b", 4, "10.3.0.2"), ("c", 4, "10.3.0.3")], tp=4, pp=3)
    (g,) = p.groups
    assert g.hosts == ("a", "b", "c")
    assert [i.rank for i in p.instances] == [0, 1, 2]
    for i in p.instances:
        assert i.argv[-len(nodes(3, i.rank, "10.3.0.1")):] == nodes(3, i.rank, "10.3.0.1")
    assert [dict(i.env)["VLLM_HOST_IP"] for i in p.instances] == [
        "10.3.0.1", "10.3.0.2", "10.3.0.3"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("hosts", "sizes_", "words"), [
    # non-integral data parallel: 2 ranks per 4-GPU host, 3 ranks
    ([("a", 4, None), ("b", 4, None)], {"tp": 2, "dp": 3},
     "deployment.data_parallel_size: 3 does not split over hosts of 4 GPUs (a, b): each "
     "holds 2 data-parallel rank(s)"),
    # pipeline: TP larger than a host
    ([("a", 4, None), ("b", 4, None)], {"tp": 8, "pp": 1},
     "deployment.tensor_parallel_size: 8 with pipeline_parallel_size 1 over hosts of 4 GPUs "
     "(a, b)"),
    # pipeline: TP that does not fill a host, tp x pp not a whole number of hosts
    ([("a", 4, None), ("b", 4, None)], {"tp": 3, "pp": 2},
     "deployment.tensor_parallel_size: 3 with pipeline_parallel_size 2 over hosts of 4"),
    # pipeline: dp > 1
    ([("a", 4, None), ("b", 4, None)], {"tp": 4, "pp": 2, "dp": 2},
     "deployment.data_parallel_size: 2 with tensor_parallel_size 4"),
    # not enough hosts of the count
    ([("a", 2, None), ("b", 2, None)], {"tp": 2, "dp": 4},
     "a node group needs 4 hosts of 2 GPUs and the inventory has 2 (a (2 GPUs), b (2 GPUs)); "
     "add hosts with 2 GPUs, or lower the parallel sizes to fit 2 GPUs"),
])
def test_groups_that_cannot_be_formed_are_refused_naming_hosts_and_counts(make, hosts, sizes_,
                                                                          words):
    lines = refused(make, hosts, **sizes_)
    # one line per host, each naming it, its GPU count, why no group serves and the fix
    assert [line.split(":")[0] for line in lines] == ["host a", "host b"]
    assert all(f"has {hosts[0][1]} GPUs but one instance needs" in line and words in line
               for line in lines), lines


def test_unequal_hosts_that_cannot_group_are_refused_one_line_per_gpu_count(make):
    lines = refused(make, [("gpu1", 8, None), ("gpu2", 4, None)], tp=8, pp=2)
    need = ("one instance needs 16 (tensor_parallel_size 8 x pipeline_parallel_size 2 x "
            "data_parallel_size 1)")
    assert lines == [
        f"host gpu1: has 8 GPUs but {need}; a node group needs 2 hosts of 8 GPUs and the "
        "inventory has 1 (gpu1 (8 GPUs), gpu2 (4 GPUs)); add hosts with 8 GPUs, or lower the "
        "parallel sizes to fit 8 GPUs",
        f"host gpu2: has 4 GPUs but {need}; no node group of 4-GPU hosts can serve it: "
        "deployment.tensor_parallel_size: 8 with pipeline_parallel_size 2 over hosts of 4 GPUs "
        "(gpu2): across hosts tensor parallelism stays inside a host and pipeline parallelism "
        "spans hosts (vLLM's convention), so tensor_parallel_size must divide 4 and tp x pp "
        "be a multiple of 4; use tensor_parallel_size 4 and pipeline_parallel_size 4",
    ]


def test_a_host_that_fits_alone_keeps_the_per_host_refusal_of_a_small_one(make):
    # no group forms: the small host is named as in a plan without groups
    lines = refused(make, [("big", 8, None), ("small", 4, None)], tp=8)
    assert lines[0].startswith("host small: has 4 GPUs but one instance needs 8")


def test_a_host_without_gpus_is_named_as_before(make):
    lines = refused(make, [("cpu", 0, None), ("b", 2, None)], tp=4)
    assert lines[0] == ("host cpu: has 0 GPUs but one instance needs 4 (tensor_parallel_size 4 "
                        "x pipeline_parallel_size 1 x data_parallel_size 1); lower the parallel "
                        "sizes to fit 0 GPUs or drop the host from the inventory")
    assert lines[1].startswith("host b: has 2 GPUs but one instance needs 4")
    # beside a group it is left out
    p = make([("a", 2, None), ("b", 2, None), ("cpu", 0, None)], tp=2, pp=2)
    assert p.groups[0].hosts == ("a", "b") and p.host("cpu").instances == ()
    assert any(n.endswith("(cpu): they have no GPU") for n in p.notes)


def test_one_host_too_small_is_refused_as_before(make):
    (line,) = refused(make, [("gpu1", 4, None)], tp=8)
    assert line.startswith("host gpu1: has 4 GPUs but one instance needs 8")


@pytest.mark.parametrize(("extra", "option"), [
    ("--headless", "--headless"),
    ("--data-parallel-rpc-port 1234", "--data-parallel-rpc-port"),
    ("--data-parallel-addr=10.0.0.9", "--data-parallel-address"),  # an abbreviation
    ("--distributed-executor-backend mp", "--distributed-executor-backend"),
])
def test_extra_args_cannot_set_what_a_group_sets(make, extra, option):
    (line,) = refused(make, [("a", 4, None), ("b", 4, None)], tp=2, dp=4, extra_args=extra)
    assert line.startswith(f"deployment.extra_args: '{extra.split()[0]}' ({option}) is set "
                           "by evalprov on the members of node group group-0")


def test_extra_args_with_group_flags_are_fine_on_one_host(make):
    p = make([("a", 8, None)], tp=2, dp=4, extra_args="--data-parallel-rpc-port 1234")
    assert p.groups == () and p.instances[0].argv[-2:] == ("--data-parallel-rpc-port", "1234")


def test_the_group_port_must_not_be_the_api_port(make):
    (line,) = refused(make, [("a", 4, None), ("b", 4, None)], tp=2, dp=4,
                      deployment={"port": DP_RPC_PORT})
    assert line == ("deployment.port: 29550 is node group group-0's data-parallel rpc port "
                    "on its head a; pick another deployment.port")
    assert refused(make, [("a", 4, None), ("b", 4, None)], tp=4, pp=2,
                   deployment={"port": MASTER_PORT})[0].startswith(
        "deployment.port: 29501 is node group group-0's torch.distributed master port on its "
        "head a")


def test_several_instances_per_host_with_a_group_are_refused(make):
    (line,) = refused(make, [("a", 4, None), ("b", 4, None)], tp=2, dp=4,
                      instances_per_host=2)
    assert line.startswith("execution.instances_per_host: 2 with a deployment over node "
                           "groups (group-0)")
    assert make([("a", 4, None), ("b", 4, None)], tp=2, dp=4,
                instances_per_host="auto").groups


# --------------------------------------------------------------------------- hosts left over


def test_hosts_that_make_no_whole_group_are_left_out_with_a_note(make):
    p = make([("a", 4, None), ("b", 4, None), ("c", 4, None)], tp=4, dp=2)
    assert [g.hosts for g in p.groups] == [("a", "b")]
    assert p.host("c").instances == () and p.host("c").tasks == ()
    assert any(n.startswith("1 host(s) with 4 GPUs left out of the node groups, no instance "
                            "and no task (c): a node group needs 2 hosts of 4 GPUs")
               for n in p.notes)


def test_unequal_hosts_group_only_with_their_equals(make):
    # two 4-GPU hosts form a group; the lone 2-GPU host is left out, saying why
    p = make([("a", 4, None), ("b", 4, None), ("c", 2, None)], tp=2, dp=4)
    assert [g.hosts for g in p.groups] == [("a", "b")]
    assert p.host("c").instances == () and p.host("c").tasks == ()
    (note,) = [n for n in p.notes if "left out" in n]
    assert note.startswith("1 host(s) with 2 GPUs left out of the node groups, no instance "
                           "and no task (c): a node group needs 4 hosts of 2 GPUs")
    # with an 8-GPU host, it serves an instance of its own beside the group
    p = make([("a", 4, None), ("b", 4, None), ("big", 8, None)], tp=2, dp=4)
    assert [g.hosts for g in p.groups] == [("a", "b")]
    assert p.host("big").instances[0].role == "single"
    assert sorted({t.host for t in p.task_runs}) == ["a", "big"]


def test_unknown_gpu_counts_plan_per_host_as_before(make):
    p = make([("a", None, None), ("b", None, None)], tp=2, dp=4)
    assert p.groups == () and all(i.role == "single" for i in p.instances)
    assert any("GPU counts not given" in n for n in p.notes)
    # one unknown count is enough: no group is guessed, the known small host is refused
    lines = refused(make, [("a", 4, None), ("b", None, None)], tp=2, dp=4)
    assert [line.split(":")[0] for line in lines] == ["host a"]


def test_an_address_that_is_a_name_gets_a_note(make):
    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, None)], tp=2, dp=4)
    assert any(n.startswith("group-0: h2 is a name, not an IP address") for n in p.notes)
    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, "fd00::2")], tp=2, dp=4)
    assert not any("not an IP address" in n for n in p.notes)


# --------------------------------------------------------------------------- spec hashes


def test_a_moved_head_recreates_every_member(make):
    one = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    two = make([("h1", 4, "10.1.0.9"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    assert all(a.spec_hash != b.spec_hash for a, b in zip(one.instances, two.instances,
                                                           strict=True))


def test_a_changed_group_recreates_its_head_too(make):
    one = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    two = make([("h1", 4, "10.1.0.1"), ("h3", 4, "10.1.0.3")], tp=2, dp=4)
    assert one.host("h1").instances[0].argv == two.host("h1").instances[0].argv
    assert one.host("h1").instances[0].spec_hash != two.host("h1").instances[0].spec_hash


def test_an_unchanged_group_plans_the_same_hashes(make):
    hosts = [("h1", 8, "10.2.0.1"), ("h2", 8, "10.2.0.2")]
    assert ([i.spec_hash for i in make(hosts, tp=8, pp=2).instances]
            == [i.spec_hash for i in make(hosts, tp=8, pp=2).instances])


# --------------------------------------------------------------------------- what is shown


def test_plan_shows_the_groups_roles_addresses_and_argv(make):
    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    text = plan_text(p)
    assert ("node group group-0: data-parallel over h1 (10.1.0.1), h2 (10.1.0.2); 4 GPUs "
            f"each; head h1; rpc port {DP_RPC_PORT} on 10.1.0.1") in text
    assert "  mode: data-parallel (vLLM multi-node data parallel, headless workers): 4 " \
           "data-parallel ranks, 2 per host" in text
    assert "  head h1 at 10.1.0.1: API port 8000, data-parallel ranks 0-1; GPUs 0-3" in text
    assert "  worker h2 at 10.1.0.2: headless, no API, data-parallel ranks 2-3; GPUs 0-3" in text
    assert "instance evalprov-vllm-0 (head of group-0)  port 8000" in text
    assert "instance evalprov-vllm-0 (worker of group-0, ranks 2-3)  no API port" in text
    import shlex

    for inst in p.instances:  # every member's exact argv
        assert f"    argv: {shlex.join(inst.argv)}\n" in text


def test_plan_shows_the_pipeline_group_and_the_hosts_left_out(make):
    import shlex

    p = make([("h1", 8, "10.2.0.1"), ("h2", 8, "10.2.0.2"), ("h3", 4, "10.2.0.3")], tp=8,
             pp=2)
    text = plan_text(p)
    assert f"master port {MASTER_PORT} on 10.2.0.1" in text
    assert "one world of 16 GPUs over 2 hosts" in text
    assert "  worker h2 at 10.2.0.2: headless, no API, node rank 1; GPUs 0-7" in text
    for inst in p.instances:
        assert f"    argv: {shlex.join(inst.argv)}\n" in text
    assert "    env set: VLLM_HOST_IP=10.2.0.2" in text
    assert "host h3 (4 GPUs)\n  no instance: in no node group (see the notes)" in text
    assert "2 host(s)" not in text and "3 host(s), 1 instance(s), 3 task run(s)" in text


def test_inventory_gives_each_member_its_part(make):
    p = make([("h1", 8, "10.2.0.1"), ("h2", 8, "10.2.0.2"), ("h3", 4, None)], tp=8, pp=2)
    hosts = render(p)["all"]["hosts"]
    head, worker = hosts["h1"]["evalprov_plan_node_group"], hosts["h2"]["evalprov_plan_node_group"]
    common = {"name": "group-0", "mode": "pipeline-parallel", "hosts": ["h1", "h2"],
              "addresses": ["10.2.0.1", "10.2.0.2"], "head": "h1", "head_address": "10.2.0.1",
              "port": MASTER_PORT, "gpus_per_host": 8, "local_ranks": 0}
    assert head == {**common, "role": "head", "rank": 0, "api_port": 8000,
                    "argv": list(p.host("h1").instances[0].argv)}
    assert worker == {**common, "role": "worker", "rank": 1, "api_port": 0,
                      "argv": list(p.host("h2").instances[0].argv)}
    (inst,) = hosts["h2"]["evalprov_plan_instances"]
    assert {k: inst[k] for k in ("role", "group", "rank", "nodes", "head_address",
                                 "rpc_port", "serves", "port")} == {
        "role": "worker", "group": "group-0", "rank": 1, "nodes": ["h1", "h2"],
        "head_address": "10.2.0.1", "rpc_port": MASTER_PORT, "serves": False, "port": 0}
    assert "--headless" in inst["argv"] and "ray_argv" not in inst
    # the host left out: no instance, no group
    assert hosts["h3"]["evalprov_plan_instances"] == []
    assert "evalprov_plan_node_group" not in hosts["h3"]


def test_a_single_instance_has_no_group_variables(make):
    hosts = render(make([("a", 8, None)], tp=2))["all"]["hosts"]
    assert "evalprov_plan_node_group" not in hosts["a"]
    assert "role" not in hosts["a"]["evalprov_plan_instances"][0]


# --------------------------------------------------------------------------- apply


PROBED = dict(gpu_count=4, docker_present=True, docker_running=True, nvidia_runtime=True,
              haproxy="/usr/sbin/haproxy", image_id="sha256:1", image_digests=("d@1",),
              remote_digest="d@1")


def group_facts(p, running=("h1", "h2"), **extra):
    """Probe facts of h1 and h2 as if each member of the plan's group were running (those
    in ``running``) with its planned spec."""
    from evalprov.check import HostFacts as Probed
    from evalprov.check import Unit

    out = {}
    for h in ("h1", "h2"):
        units = {i.name: Unit(i.name, i.spec_hash, True, i.serves, i.port)
                 for i in p.host(h).instances if h in running}
        out[h] = Probed(**PROBED, units=units, **extra)
    return out


def test_apply_starts_a_data_parallel_group_and_waits_for_every_member(make):
    from evalprov.check import check
    from evalprov.decide import group_wait, wait_vars

    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    checked = check(p, group_facts(p, running=()))
    assert checked.problems == ()
    h1, h2 = checked.hosts["h1"], checked.hosts["h2"]
    assert [i.name for i in h1.start] == [i.name for i in h1.wait] == ["evalprov-vllm-0"]
    # the worker is waited for too: while its process runs, until its head serves
    assert [i.role for i in h2.start] == [i.role for i in h2.wait] == ["worker"]
    assert wait_vars(h2.wait[0]) == {"name": "evalprov-vllm-0", "port": 0, "role": "worker",
                                     "group": "group-0", "rank": 2, "head": "h1"}
    assert group_wait(p, h1, "run1") == {
        "name": "group-0", "run": "run1", "role": "head", "rank": 0, "head": "h1",
        "workers": ["h2"], "others": ["h2"]}
    assert group_wait(p, h2, "run1")["others"] == ["h1"]


def test_a_group_member_that_stopped_restarts_the_whole_group(make):
    from evalprov.check import check

    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    steady = check(p, group_facts(p))
    assert steady.hosts["h1"].converged or steady.hosts["h1"].tasks
    assert steady.hosts["h1"].start == steady.hosts["h2"].start == ()
    # the worker's process is gone: the head, still running, cannot take it back
    checked = check(p, group_facts(p, running=("h1",)))
    assert [i.role for i in checked.hosts["h1"].start] == ["head"]
    assert any("its node group group-0 restarts (evalprov-vllm-0 on h2 not there)" in r
               for r in checked.hosts["h1"].reasons), checked.hosts["h1"].reasons
    assert [i.role for i in checked.hosts["h2"].start] == ["worker"]


def test_a_pipeline_group_is_checked_like_a_data_parallel_one(make):
    """Nothing refuses a pipeline-parallel group any more: a converged group is left alone,
    a lost worker restarts the whole group (both members start again)."""
    from evalprov.check import check

    p = make([("h1", 8, "10.2.0.1"), ("h2", 8, "10.2.0.2")], tp=8, pp=2)
    facts = {h: dataclasses.replace(f, gpu_count=8) for h, f in group_facts(p).items()}
    steady = check(p, facts)
    assert steady.problems == ()
    assert steady.hosts["h1"].start == steady.hosts["h2"].start == ()
    lost = {h: dataclasses.replace(f, gpu_count=8)
            for h, f in group_facts(p, running=("h1",)).items()}
    checked = check(p, lost)
    assert checked.problems == ()
    assert [i.role for i in checked.hosts["h1"].start] == ["head"]
    assert [i.role for i in checked.hosts["h2"].start] == ["worker"]


@pytest.mark.parametrize(("sizes_", "port", "what"), [
    ({"tp": 2, "dp": 4}, DP_RPC_PORT, "rpc"), ({"tp": 4, "pp": 2}, MASTER_PORT, "master")])
def test_a_group_port_held_by_something_else_on_the_head_is_a_problem(make, sizes_, port,
                                                                      what):
    """The head's rpc (data parallel) or master (pipeline parallel) port, which its workers
    dial, is checked like the API port: taken by a process evalprov did not start, one line
    naming it; held by the group's own running head, no problem."""
    from evalprov.check import check

    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], **sizes_)
    taken = group_facts(p, running=(), listening=frozenset({port}))
    taken = {h: dataclasses.replace(f, gpu_count=4) for h, f in taken.items()}
    problems = check(p, taken).problems
    assert problems == (f"host h1: port {port}, node group group-0's {what} port on its head, "
                        "is already in use by something evalprov did not start; stop it",)
    ours = {h: dataclasses.replace(f, gpu_count=4) for h, f in
            group_facts(p, listening=frozenset({port})).items()}
    assert check(p, ours).problems == ()
