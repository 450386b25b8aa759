"""The proxy in front of a host's instances: planned (port, servers, config, tasks through
it), refused when its values cannot work, checked against the probe's facts and turned into
actions."""

from __future__ import annotations

import pytest

from evalprov.check import HostFacts, check
from evalprov.errors import PlanError
from evalprov.plan import HostFacts as PlanHost
from evalprov.plan import plan

TASKS = [{"name": "ifeval"}, {"name": "gpqa_diamond"}]


def facts(**over) -> HostFacts:
    base = dict(gpu_count=8, docker_present=True, docker_running=True, nvidia_runtime=True,
                haproxy="/usr/sbin/haproxy")
    return HostFacts(**{**base, **over})


@pytest.fixture
def make(vllm_config):
    def make(proxy=None, instances="auto", tp=2, hosts=(("h", 8),), **dep):
        execution = {"instances_per_host": instances}
        if proxy is not None:
            execution["proxy"] = proxy
        config = vllm_config(tasks=TASKS, deployment={"tensor_parallel_size": tp,
                                                      "image": "vllm/vllm-openai:v0.11.0", **dep},
                             execution=execution)
        return plan(config, [PlanHost(n, g) for n, g in hosts])
    return make


def test_several_instances_on_a_host_get_one_proxy_and_every_task_calls_it(make):
    p = make(hosts=(("a", 8), ("b", 2)))
    a, b = p.hosts
    assert a.proxy is not None and b.proxy is None  # b has one instance
    assert a.proxy.port == 5009 and a.proxy.stats_port == 5010
    assert a.proxy.servers == tuple((f"evalprov-vllm-{i}", 8000 + i) for i in range(4))
    assert [t.url for t in a.tasks] == ["http://127.0.0.1:5009/v1/chat/completions"]
    assert [t.instance for t in a.tasks] == ["evalprov-lb"]
    assert [t.url for t in b.tasks] == ["http://127.0.0.1:8000/v1/chat/completions"]
    cfg = a.proxy.config
    assert "    bind 127.0.0.1:5009" in cfg and "    bind 127.0.0.1:5010" in cfg
    assert all(f"    server evalprov-vllm-{i} 127.0.0.1:{8000 + i}" in cfg for i in range(4))


def test_nels_proxy_settings_are_read(make):
    p = make(proxy={"type": "haproxy", "image": "haproxy:latest",
                    "config": {"haproxy_port": 7000, "health_check_path": "/ping",
                               "health_check_status": 200}})
    (h,) = p.hosts
    assert h.proxy.port == 7000 and "uri /ping " in h.proxy.config


def test_type_none_keeps_tasks_round_robin_over_the_instances(make):
    (h,) = make(proxy={"type": "none"}).hosts
    assert h.proxy is None
    assert [t.instance for t in h.tasks] == ["evalprov-vllm-0", "evalprov-vllm-1"]


@pytest.mark.parametrize(("proxy", "words"), [
    ({"type": "nginx"}, "execution.proxy.type: 'nginx'"),
    ({"config": {"haproxy_port": 8001}}, "the port of instance evalprov-vllm-1"),
    ({"config": {"haproxy_port": 7999}}, "haproxy_port + 1 (its stats) is 8000"),
    ({"config": {"haproxy_port": "5009; rm"}}, "is not a port"),
    ({"config": {"haproxy_port": 70000}}, "is not a port"),
    ({"config": {"health_check_status": 204}}, "health_check_status: 204"),
    ({"config": {"health_check_path": "/h\nlisten x"}}, "execution.proxy.config:"),
    ({"config": "5009"}, "execution.proxy.config: '5009' is not a map"),
])
def test_a_proxy_that_cannot_work_is_one_line_naming_the_field(make, proxy, words):
    with pytest.raises(PlanError) as err:
        make(proxy=proxy)
    (line,) = err.value.lines
    assert words in line and "\n" not in line


def test_the_proxy_spec_follows_its_instances(make):
    one, two = make().hosts[0].proxy, make(extra_args="--max-model-len 2048").hosts[0].proxy
    assert one.spec_hash != two.spec_hash
    assert make().hosts[0].proxy.spec_hash == one.spec_hash


def test_check_wants_haproxy_and_its_ports_free(make):
    p = make()
    assert check(p, {"h": facts()}).problems == ()
    (missing,) = check(p, {"h": facts(haproxy="")}).problems
    assert "host h: haproxy is not installed" in missing and "proxy.type: none" in missing
    (busy,) = check(p, {"h": facts(listening=frozenset({5010}))}).problems
    assert "port(s) 5010 already in use" in busy


def test_actions_start_wait_and_remove_the_proxy(make):
    from evalprov.check import Unit

    p = make()
    proxy = p.hosts[0].proxy
    units = {i.name: Unit(i.name, i.spec_hash, True, True, i.port, "sha256:1")
             for i in p.instances}
    a = check(p, {"h": facts(units=units, image_id="sha256:1")}).hosts["h"]
    assert a.proxy_start == proxy and a.proxy_wait == proxy  # not there yet
    assert not a.start
    ours = Unit("evalprov-lb", proxy.spec_hash, True, True, 5009)
    a = check(p, {"h": facts(units=units, proxy=ours, image_id="sha256:1")}).hosts["h"]
    assert (a.proxy_start, a.proxy_wait, a.proxy_remove) == (None, None, False)
    assert not [r for r in a.reasons if "evalprov-lb" in r]
    # an instance that comes back: the proxy stays, and is waited for with it
    restarted = {**units, "evalprov-vllm-1": Unit("evalprov-vllm-1", "old", True, True, 8001)}
    a = check(p, {"h": facts(units=restarted, proxy=ours, image_id="sha256:1")}).hosts["h"]
    assert a.proxy_start is None and a.proxy_wait == proxy
    stale = Unit("evalprov-lb", "old", True, True, 5009)
    a = check(p, {"h": facts(units=units, proxy=stale, image_id="sha256:1")}).hosts["h"]
    assert a.proxy_start == proxy
    assert any(r.startswith("start evalprov-lb: spec changed") for r in a.reasons)
    a = check(make(proxy={"type": "none"}),
              {"h": facts(units=units, proxy=ours, image_id="sha256:1")}).hosts["h"]
    assert a.proxy_remove and "remove evalprov-lb: not in the plan" in a.reasons


def test_a_task_behind_the_proxy_watches_each_instance_directly(make):
    """While tasks run, their servers' /health is watched: behind a proxy, each instance's
    own (through the proxy the looks would be counted as requests the instances answered);
    a task on a single instance watches that one."""
    from evalprov.decide import health_urls

    p = make(hosts=(("a", 8), ("b", 2)))
    a, b = p.hosts
    assert health_urls(p, a.tasks[0]) == [f"http://127.0.0.1:{8000 + i}/health"
                                         for i in range(4)]
    assert health_urls(p, b.tasks[0]) == ["http://127.0.0.1:8000/health"]
