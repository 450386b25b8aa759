"""Properties of the planner over random parallel sizes, instance counts, host GPU counts,
ports, task lists and extra_args: what must hold for every plan it makes, and exactly when it
refuses to make one."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from evalprov.config.models import extra_arg_refusal
from evalprov.errors import ConfigError, PlanError
from evalprov.plan import HostFacts, plan

TASK_POOL = ["ifeval", "gpqa_diamond", "mmlu", "mmlu_pro", "math_test_500", "mbpp-chat",
             "mmlu_instruct", "chartqa"]
BASE_ARGV_LEN = 15
FAST = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# One argument of extra_args: any text the config accepts (no NUL/CR/LF, not an option
# evalprov sets itself as vLLM reads it, nor --api-key), shell metacharacters and quotes
# included.
token = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0\r\n",
                           exclude_categories=("Cs",)),
    max_size=12,
).filter(lambda t: extra_arg_refusal(t) is None)

# distinct GPU counts: two too-small hosts of one count would form a node group instead of
# being refused (tests/unit/test_multinode_plan.py)
hosts_st = st.lists(st.one_of(st.none(), st.integers(0, 40)), min_size=1, max_size=4,
                    unique=True)


def _count(wanted: int | str, gpus: int | None, need: int) -> int:
    if wanted == "auto":
        return max(1, (gpus or need) // need)
    return int(wanted)


@given(
    tp=st.integers(1, 4), pp=st.integers(1, 2), dp=st.integers(1, 4),
    wanted=st.one_of(st.just("auto"), st.integers(1, 4)),
    gpus=hosts_st,
    port=st.integers(1, 65535),
    tasks=st.lists(st.sampled_from(TASK_POOL), unique=True, max_size=len(TASK_POOL)),
    placement=st.sampled_from(["shard", "every_host"]),
    extra=st.lists(token, max_size=5),
)
@FAST
def test_planner_properties(vllm_config, tp, pp, dp, wanted, gpus, port, tasks, placement,
                            extra):
    need = tp * pp * dp
    config = vllm_config(
        deployment={"tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                    "data_parallel_size": dp, "port": port, "extra_args": shlex.join(extra)},
        # without the proxy (its port is tested in test_proxy_plan.py): tasks round-robin
        execution={"instances_per_host": wanted, "placement": placement,
                   "proxy": {"type": "none"}},
        tasks=[{"name": t} for t in tasks],
    )
    hosts = [HostFacts(f"h{i}", g) for i, g in enumerate(gpus)]
    counts = {h.name: _count(wanted, h.gpus, need) for h in hosts}
    lacks = [h.name for h in hosts if h.gpus is not None and h.gpus < need * counts[h.name]]
    overflow = [h.name for h in hosts if port + counts[h.name] - 1 > 65535]

    # PlanError exactly when a host lacks GPUs (or its ports would pass 65535), naming it
    if lacks or overflow:
        event("refused")
        with pytest.raises(PlanError) as err:
            plan(config, hosts)
        for name in lacks + overflow:
            assert any(line.startswith(f"host {name}:") for line in err.value.lines)
        return
    event("planned")
    p = plan(config, hosts)

    for hp in p.hosts:
        insts = hp.instances
        assert len(insts) == counts[hp.host]
        # GPU sets: the right size, pairwise disjoint, within the host
        used = [g for i in insts for g in i.gpus]
        assert all(len(i.gpus) == need for i in insts)
        assert len(used) == len(set(used))
        if hp.gpus_total is not None:
            assert all(0 <= g < hp.gpus_total for g in used)
        # ports: unique on the host, valid, and the one the argv names
        ports = [i.port for i in insts]
        assert len(ports) == len(set(ports))
        assert all(1 <= pt <= 65535 for pt in ports)
        for inst in insts:
            argv = list(inst.argv)
            assert argv[argv.index("--port") + 1] == str(inst.port)
            # argv survives shell quoting both ways; extra_args tokens end it, in order
            assert shlex.split(shlex.join(argv)) == argv
            assert argv[BASE_ARGV_LEN:] == extra

    # placement: each task once (shard) or once on every host (every_host)
    runs = [(t.host, t.name) for t in p.task_runs]
    assert len(runs) == len(set(runs))
    if placement == "shard":
        assert sorted(name for _, name in runs) == sorted(tasks)
    else:
        for hp in p.hosts:
            assert [t.name for t in hp.tasks] == tasks
    # every task is served by an instance of its own host
    names = {hp.host: {i.name for i in hp.instances} for hp in p.hosts}
    assert all(t.instance in names[t.host] for t in p.task_runs)


@given(extra=st.text(alphabet=st.sampled_from(list("ab -='\"\\;$()`|&*")), max_size=30))
@FAST
def test_any_accepted_extra_args_string_ends_the_argv_split_by_shell_rules(vllm_config, extra):
    try:
        config = vllm_config(deployment={"extra_args": extra})
    except ConfigError:
        assume(False)
        return
    (inst,) = plan(config, [HostFacts("h", 8)]).instances
    assert list(inst.argv[BASE_ARGV_LEN:]) == shlex.split(extra)
    assert shlex.split(shlex.join(inst.argv)) == list(inst.argv)
