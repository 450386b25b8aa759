"""Which hosts a run targets and what is known of their GPUs: inventories (parsed by
ansible-core), `--gpus`, `--facts`, `--limit`, and the one-line errors for bad input."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from evalprov.cli import main
from evalprov.errors import InventoryError
from evalprov.hosts import host_facts
from evalprov.plan import HostFacts

INI = """\
[gpu]
gpu-a evalprov_gpu_count=8
gpu-b
gpu-c

[cpu]
cpu-a

[gpu:vars]
evalprov_gpu_count=4
"""

YAML = """\
all:
  children:
    gpu:
      hosts:
        gpu-a:
          ansible_host: 192.0.2.11
          evalprov_gpu_count: 8
        gpu-b:
        gpu-c:
      vars:
        evalprov_gpu_count: 4
    cpu:
      hosts:
        cpu-a:
"""


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture(params=["ini", "yaml"])
def inventory(request, tmp_path) -> str:
    """The same four-host inventory, as INI and as YAML."""
    if request.param == "ini":
        return write(tmp_path, "hosts.ini", INI)
    return write(tmp_path, "hosts.yml", YAML)


def facts_of(*args, **kw) -> dict[str, int | None]:
    return {h.name: h.gpus for h in host_facts(*args, **kw)}


def one_line_error(*args, **kw) -> str:
    with pytest.raises(InventoryError) as err:
        host_facts(*args, **kw)
    (line,) = err.value.lines
    assert "\n" not in line
    return line


# --------------------------------------------------------------------------- inventories


def test_group_vars_give_gpu_counts_and_host_vars_win(inventory):
    assert facts_of("baremetal", inventory) == {
        "gpu-a": 8, "gpu-b": 4, "gpu-c": 4, "cpu-a": None,
    }


def test_host_names_and_counts_are_plain_python_values(inventory):
    # ansible-core hands out tagged str/int subclasses; yaml.safe_dump refuses them
    hosts = host_facts("baremetal", inventory)
    assert all(type(h.name) is str for h in hosts)
    assert all(type(h.gpus) in (int, type(None)) for h in hosts)
    yaml.safe_dump([[h.name, h.gpus] for h in hosts])


def test_group_vars_directory_next_to_the_inventory_is_read(tmp_path):
    inv = write(tmp_path, "inv/hosts.ini", "[gpu]\nn1\nn2 evalprov_gpu_count=2\n")
    write(tmp_path, "inv/group_vars/gpu.yml", "evalprov_gpu_count: 6\n")
    assert facts_of("baremetal", inv) == {"n1": 6, "n2": 2}


def test_only_evalprov_variables_and_the_address_are_kept(tmp_path):
    from evalprov.hosts import host_facts, read_inventory

    inv = write(tmp_path, "hosts.yml", YAML)
    selected, everyone = read_inventory(inv)
    assert selected["gpu-a"] == {"evalprov_gpu_count": 8, "ansible_host": "192.0.2.11"}
    # the address other hosts reach it at (a node group's), else its name
    by_name = {h.name: h for h in host_facts("baremetal", inv)}
    assert by_name["gpu-a"].reach == "192.0.2.11" and by_name["gpu-b"].reach == "gpu-b"
    assert everyone == {"gpu-a", "gpu-b", "gpu-c", "cpu-a"}


def test_directory_inventory_with_group_vars(tmp_path):
    write(tmp_path, "inv/a.ini", "[gpu]\nn1\n")
    write(tmp_path, "inv/b.yml", "all:\n  hosts:\n    n2:\n      evalprov_gpu_count: 2\n")
    write(tmp_path, "inv/group_vars/gpu.yml", "evalprov_gpu_count: 6\n")
    write(tmp_path, "inv/README.md", "# not an inventory\n")
    assert facts_of("baremetal", str(tmp_path / "inv")) == {"n1": 6, "n2": 2}


def test_one_bad_file_of_a_directory_inventory_is_an_error_naming_it(tmp_path, capfd):
    write(tmp_path, "inv/good.yml", "all:\n  hosts:\n    n1:\n")
    bad = write(tmp_path, "inv/bad.yml", "all: [unclosed\n  - :\n")
    line = one_line_error("baremetal", str(tmp_path / "inv"))
    assert line.startswith(f"inventory: {bad}: cannot be parsed (YAML")
    assert capfd.readouterr() == ("", "")


def test_inline_host_list_as_ansible_takes_it():
    assert facts_of("baremetal", "n1,n2,", gpus=2) == {"n1": 2, "n2": 2}


def test_the_fleet_example_inventory(repo):
    assert facts_of("baremetal", str(repo / "inventories" / "fleet.yml")) == {
        "gpu-node-01": 8, "gpu-node-02": 4,
    }


# --------------------------------------------------------------------------- precedence


def test_gpus_flag_overrides_the_inventory_variable(inventory):
    assert set(facts_of("baremetal", inventory, gpus=2).values()) == {2}


def test_facts_file_overrides_gpus_flag_and_inventory(inventory, tmp_path):
    facts = write(tmp_path, "facts.yml", """\
        gpu-a: 1
        gpu-b: {gpus: 3}
        cpu-a: {gpu_count: 0}
    """)
    assert facts_of("baremetal", inventory, gpus=2, facts=facts) == {
        "gpu-a": 1, "gpu-b": 3, "gpu-c": 2, "cpu-a": 0,
    }
    assert facts_of("baremetal", inventory, facts=facts) == {
        "gpu-a": 1, "gpu-b": 3, "gpu-c": 4, "cpu-a": 0,
    }


def test_facts_as_json_with_gpu_lists_as_preflight_reports_them(inventory, tmp_path):
    facts = write(tmp_path, "facts.json", json.dumps(
        {"gpu-c": [{"name": "H100"}, {"name": "H100"}], "gpu-a": {"gpus": ["A", "B", "C"]}}
    ))
    got = facts_of("baremetal", inventory, facts=facts)
    assert got["gpu-c"] == 2 and got["gpu-a"] == 3


# --------------------------------------------------------------------------- --limit


@pytest.mark.parametrize(
    ("limit", "hosts"),
    [
        ("gpu-b", ["gpu-b"]),
        ("gpu", ["gpu-a", "gpu-b", "gpu-c"]),
        ("gpu:!gpu-a", ["gpu-b", "gpu-c"]),
        ("gpu-c,cpu-a", ["gpu-c", "cpu-a"]),
        ("gpu-[a:b]", ["gpu-a", "gpu-b"]),
    ],
)
def test_limit_selects_hosts_as_ansible_does(inventory, limit, hosts):
    assert sorted(facts_of("baremetal", inventory, limit=limit)) == sorted(hosts)


def test_limit_from_a_file_as_ansible_does(inventory, tmp_path):
    limit_file = write(tmp_path, "only", "gpu-c\n")
    assert list(facts_of("baremetal", inventory, limit=f"@{limit_file}")) == ["gpu-c"]


def test_facts_for_hosts_outside_the_limit_are_not_an_error(inventory, tmp_path):
    facts = write(tmp_path, "facts.yml", "gpu-a: 8\ngpu-b: 8\ncpu-a: 0\n")
    assert facts_of("baremetal", inventory, facts=facts, limit="gpu-b") == {"gpu-b": 8}


def test_limit_matching_nothing_is_one_line(inventory):
    line = one_line_error("baremetal", inventory, limit="nope")
    assert line.startswith("--limit 'nope': matches no host")


def test_limit_file_missing_is_one_line(inventory, tmp_path):
    line = one_line_error("baremetal", inventory, limit=f"@{tmp_path}/missing")
    assert line.startswith("--limit") and "limit file" in line


# --------------------------------------------------------------------------- errors


def test_missing_inventory_file(tmp_path):
    line = one_line_error("baremetal", str(tmp_path / "nope.yml"))
    assert line.startswith("inventory: ") and "nope.yml" in line and "not found" in line


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("bad.yml", "all:\n  hosts: [unclosed\n  - :\n", "YAML"),
        ("bad.ini", "[gpu\nthis is not = an inventory line\n", "parse"),
        ("bad.yaml", "all:\n  hosts:\n    a:\n      - not a mapping\n", ""),
    ],
)
def test_unparsable_inventory_is_one_line_and_ansible_prints_nothing(tmp_path, capfd, name,
                                                                     text, reason):
    path = write(tmp_path, name, text)
    line = one_line_error("baremetal", path)
    assert line.startswith(f"inventory: {path}: cannot be parsed (")
    assert reason in line
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("text", ["", "# nothing here\n", "all:\n  hosts: {}\n"])
def test_empty_inventory_is_one_line(tmp_path, text):
    path = write(tmp_path, "empty.yml", text)
    line = one_line_error("baremetal", path)
    assert line == f"inventory: {path} has no hosts; add hosts under all: or a group"


def test_facts_naming_an_unknown_host(inventory, tmp_path):
    facts = write(tmp_path, "facts.yml", "gpu-a: 8\nghost: 8\n")
    line = one_line_error("baremetal", inventory, facts=facts)
    assert line.startswith("--facts: host ghost is not in the inventory")


@pytest.mark.parametrize("value", ["-1", "eight", "8.5", "true", "[1, 2]"])
def test_bad_gpu_count_in_the_inventory(tmp_path, value):
    inv = write(tmp_path, "hosts.yml",
                f"all:\n  hosts:\n    n1:\n      evalprov_gpu_count: {value}\n")
    line = one_line_error("baremetal", inv)
    assert line.startswith("inventory: host n1: evalprov_gpu_count=")
    assert "non-negative integer" in line


def test_gpu_count_as_a_digit_string_is_accepted(tmp_path):
    inv = write(tmp_path, "hosts.yml", "all:\n  hosts:\n    n1:\n      evalprov_gpu_count: '8'\n")
    assert facts_of("baremetal", inv) == {"n1": 8}


@pytest.mark.parametrize("value", ["-1", "x", "8.5", "true", "{gpus: -2}", "null"])
def test_bad_gpu_count_in_facts(inventory, tmp_path, value):
    facts = write(tmp_path, "facts.yml", f"gpu-a: {value}\n")
    line = one_line_error("baremetal", inventory, facts=facts)
    assert line.startswith("--facts: host gpu-a: GPU count")
    assert "non-negative integer" in line


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda d: str(d / "missing.yml"), "not found"),
        (lambda d: str(d), "cannot read"),
        (lambda d: write(d, "f.yml", "a: [unclosed\n"), "not valid YAML"),
        (lambda d: write(d, "f.yml", "- gpu-a\n- 8\n"), "must map host names"),
        (lambda d: write(d, "f.yml", ""), "must map host names"),
    ],
)
def test_unusable_facts_file(inventory, tmp_path, make, expect):
    line = one_line_error("baremetal", inventory, facts=make(tmp_path))
    assert line.startswith("--facts: ") and expect in line


# --------------------------------------------------------------------------- execution types


def test_local_execution_without_inventory_is_localhost():
    assert host_facts("local", None) == [HostFacts("localhost", None)]
    assert host_facts("local", None, gpus=0) == [HostFacts("localhost", 0)]


def test_local_execution_with_an_inventory_reads_it(inventory):
    assert "gpu-a" in facts_of("local", inventory)


def test_baremetal_without_inventory_is_one_line():
    line = one_line_error("baremetal", None)
    assert line.startswith("inventory: execution baremetal needs -i INVENTORY")


def test_slurm_plans_its_allocation_and_reads_no_inventory(tmp_path):
    assert host_facts("slurm", str(tmp_path / "not-read.yml")) == []


# --------------------------------------------------------------------------- through the CLI


def test_cli_reports_an_inventory_error_as_one_line_and_exit_2(repo, tmp_path, capsys):
    code = main(["plan", str(repo / "examples" / "baremetal_llama_3_1_8b_instruct.yaml"),
                 "-i", str(tmp_path / "nope.yml")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: inventory: ")
