"""Deployments larger than one host: node groups of equal GPU counts, their ranks,
addresses, ports and exact argv for vLLM's multi-node data parallel and for TP x PP over
Ray; the refusals; tasks on heads only."""

from __future__ import annotations

import pytest

from evalprov.errors import PlanError
from evalprov.plan import DP_RPC_PORT, RAY_PORT, HostFacts, plan
from evalprov.show import plan_text

TASKS = [{"name": "ifeval"}, {"name": "gpqa_diamond"}, {"name": "mmlu"}]


@pytest.fixture
def make(vllm_config):
    def make(hosts, tp=1, pp=1, dp=1, **execution):
        config = vllm_config(tasks=TASKS, deployment={
            "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
            "data_parallel_size": dp, "extra_args": "--max-model-len 4096"},
            execution=execution)
        return plan(config, [HostFacts(n, g, a) for n, g, a in hosts])
    return make


def flags(argv, *names):
    return {n: argv[argv.index(n) + 1] for n in names if n in argv}


def test_data_parallel_over_two_hosts_one_head_one_headless_worker(make):
    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    (g,) = p.groups
    assert (g.mode, g.hosts, g.addresses, g.local, g.port) == (
        "data-parallel", ("h1", "h2"), ("10.1.0.1", "10.1.0.2"), 2, DP_RPC_PORT)
    (head,), (worker,) = p.host("h1").instances, p.host("h2").instances
    assert (head.role, worker.role) == ("head", "worker")
    assert head.gpus == worker.gpus == (0, 1, 2, 3)
    dp = ("--data-parallel-size-local", "--data-parallel-address", "--data-parallel-rpc-port",
          "--data-parallel-start-rank")
    assert flags(head.argv, *dp) == {"--data-parallel-size-local": "2",
                                     "--data-parallel-address": "10.1.0.1",
                                     "--data-parallel-rpc-port": str(DP_RPC_PORT)}
    assert flags(worker.argv, *dp) == {"--data-parallel-size-local": "2",
                                       "--data-parallel-address": "10.1.0.1",
                                       "--data-parallel-rpc-port": str(DP_RPC_PORT),
                                       "--data-parallel-start-rank": "2"}
    assert "--headless" in worker.argv and "--headless" not in head.argv
    # one --data-parallel-size, the total
    assert [a for a in head.argv if a.startswith("--data-parallel-size=")] == [
        "--data-parallel-size=4"]
    # every task on the head, none on the worker
    assert [t.host for t in p.task_runs] == ["h1", "h1", "h1"]
    assert p.host("h2").tasks == ()


def test_four_hosts_make_two_groups_and_tasks_shard_over_their_heads(make):
    p = make([(f"h{i}", 8, None) for i in range(4)], tp=4, dp=4)
    assert [g.hosts for g in p.groups] == [("h0", "h1"), ("h2", "h3")]
    assert [g.addresses for g in p.groups] == [("h0", "h1"), ("h2", "h3")]  # no ansible_host
    assert {t.name: t.host for t in p.task_runs} == {"ifeval": "h0", "gpqa_diamond": "h2",
                                                      "mmlu": "h0"}
    ranks = [flags(i.argv, "--data-parallel-start-rank").get("--data-parallel-start-rank")
             for i in p.instances]
    assert ranks == [None, "2", None, "2"]


def test_hosts_that_make_no_whole_group_are_left_out_with_a_note(make):
    p = make([("a", 4, None), ("b", 4, None), ("c", 4, None)], tp=4, dp=2)
    assert [g.hosts for g in p.groups] == [("a", "b")]
    assert p.host("c").instances == () and p.host("c").tasks == ()
    assert any("c" in n and "left out of the node groups" in n for n in p.notes)


def test_tp_inside_a_host_pp_across_hosts_runs_on_ray(make):
    p = make([("h1", 8, "10.2.0.1"), ("h2", 8, "10.2.0.2")], tp=8, pp=2)
    (g,) = p.groups
    assert (g.mode, g.port) == ("ray", RAY_PORT)
    (head,), (worker,) = p.host("h1").instances, p.host("h2").instances
    assert head.pre_argv == ("ray", "start", "--head", "--node-ip-address", "10.2.0.1",
                             "--port", str(RAY_PORT), "--num-gpus", "8", "--block")
    assert head.argv[:2] == ("vllm", "serve")
    assert flags(head.argv, "--distributed-executor-backend") == {
        "--distributed-executor-backend": "ray"}
    assert worker.argv == ("ray", "start", "--address", f"10.2.0.1:{RAY_PORT}",
                           "--node-ip-address", "10.2.0.2", "--num-gpus", "8", "--block")
    assert worker.gpus == tuple(range(8))


@pytest.mark.parametrize(("hosts", "sizes", "words"), [
    ([("a", 4, None), ("b", 4, None)], {"tp": 2, "dp": 3},
     "deployment.data_parallel_size: 3 does not split over hosts of 4 GPUs"),
    ([("a", 4, None), ("b", 4, None)], {"tp": 8, "pp": 1},
     "deployment.tensor_parallel_size: 8 with pipeline_parallel_size 1 over hosts of 4"),
    ([("a", 4, None), ("b", 4, None)], {"tp": 4, "pp": 2, "dp": 2},
     "deployment.data_parallel_size: 2 with tensor_parallel_size 4"),
    ([("a", 2, None), ("b", 2, None)], {"tp": 2, "dp": 4},
     "needs 4 hosts of 2 GPUs; the inventory has 2 of them (a (2 GPUs), b (2 GPUs))"),
])
def test_groups_that_cannot_be_formed_are_refused_naming_hosts_and_counts(make, hosts, sizes,
                                                                          words):
    with pytest.raises(PlanError) as err:
        make(hosts, **sizes)
    assert any(words in line for line in err.value.lines), err.value.lines


def test_unequal_hosts_group_only_with_their_equals(make):
    # two 4-GPU hosts form a group; the lone 2-GPU host is named by the per-host check
    with pytest.raises(PlanError) as err:
        make([("a", 4, None), ("b", 4, None), ("c", 2, None)], tp=2, dp=4)
    assert err.value.lines[0].startswith("host c: has 2 GPUs but one instance needs 8")
    # with an 8-GPU host, it serves an instance of its own beside the group
    p = make([("a", 4, None), ("b", 4, None), ("big", 8, None)], tp=2, dp=4)
    assert [g.hosts for g in p.groups] == [("a", "b")]
    assert p.host("big").instances[0].role == "single"


def test_unknown_gpu_counts_plan_per_host_as_before(make):
    p = make([("a", None, None), ("b", None, None)], tp=2, dp=4)
    assert p.groups == () and all(i.role == "single" for i in p.instances)


def test_a_moved_head_recreates_every_member(make):
    one = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    two = make([("h1", 4, "10.1.0.9"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    assert all(a.spec_hash != b.spec_hash for a, b in zip(one.instances, two.instances,
                                                           strict=True))


def test_plan_shows_the_groups_roles_addresses_and_argv(make):
    text = plan_text(make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4))
    assert ("node group group-0: data-parallel over h1 (10.1.0.1), h2 (10.1.0.2); 4 GPUs "
            f"each; head h1; rpc port {DP_RPC_PORT} on 10.1.0.1") in text
    assert "instance evalprov-vllm-0 (head of group-0)" in text
    assert "instance evalprov-vllm-0 (worker of group-0, ranks 2-3)" in text
    assert "--headless" in text


def test_apply_refuses_a_node_group_before_anything_starts(make):
    from evalprov.check import HostFacts as Probed
    from evalprov.check import check

    p = make([("h1", 4, "10.1.0.1"), ("h2", 4, "10.1.0.2")], tp=2, dp=4)
    probed = Probed(gpu_count=4, docker_present=True, docker_running=True,
                    nvidia_runtime=True, haproxy="/usr/sbin/haproxy")
    (line,) = check(p, {"h1": probed, "h2": probed}).problems
    assert line.startswith("host h1: the deployment spans node group group-0 (h1, h2; "
                           "data-parallel)") and "lower the parallel sizes" in line
