"""See the run: the reproducibility record, GPU-hours, each host's timeline, `compare`,
`report` (HTML, escaped) and `export --to json`, on runs written through evalprov's own
ledger, results and apply.record_run (tests/unit/seerun.py)."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import sys

import pytest

from evalprov import compare, export, report, results
from evalprov.cli import main
from evalprov.ledger import Ledger
from evalprov.show import status_text
from evalprov.usage import gpu_hours
from tests.unit.seerun import DIGEST, IMAGE_ID, SECRET, make_run

HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>{{7*7}}"


@pytest.fixture
def argv_with_secret(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/evalprov", "apply", "c.yaml", "-o",
                                      f"deployment.env_vars.HF_TOKEN=lit:{SECRET}", "--forks",
                                      "3"])


def _files_holding(root, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_the_record_has_every_fact_and_no_secret(tmp_path, monkeypatch, argv_with_secret):
    made = make_run(tmp_path / "out", "r1", monkeypatch=monkeypatch)
    summary = results.load_summary(made.run_dir)
    rec = summary["record"]
    from evalprov import __version__

    assert rec["evalprov_version"] == __version__
    assert rec["argv"] == ["/usr/bin/evalprov", "apply", "c.yaml", "-o",
                           "deployment.env_vars.HF_TOKEN=***", "--forks", "3"]
    host = rec["hosts"]["h1"]
    assert host["image"]["id"] == IMAGE_ID and host["image"]["repo_digests"] == [DIGEST]
    assert host["vllm_version"] == "0.9.1" == rec["vllm_version"]
    assert host["model"] == {"kind": "hf", "id": "org/model", "revision": "f" * 40,
                             "ref": "main"}
    assert host["harness"] == {"nvcr.io/x": {"versions": {"nemo-evaluator": "0.2.8"}}}
    assert rec["model_source"]["kind"] == "hf" and rec["model_source"]["ref"] == "org/model"
    # the resolved config shows where values come from, never the values
    config = rec["config"]
    assert config["execution"]["hf_cache_dir"] == "${oc.env:EVP_TEST_CACHE}"
    assert config["deployment"]["env_vars"] == {"HF_TOKEN": "host:EVP_TEST_HF_TOKEN"}
    assert config["deployment"]["tensor_parallel_size"] == 2
    assert re.fullmatch(r"[0-9a-f]{64}", rec["config_sha256"])
    # the same record in the ledger; the secret in no file evalprov wrote
    with Ledger(made.out) as led:
        assert led.record_of("r1") == json.loads(json.dumps(rec))
    assert _files_holding(made.out, SECRET) == []
    assert _files_holding(made.out, "/var/lib/evp-cache") == []


def test_a_fact_the_host_did_not_give_is_null_with_a_reason(tmp_path, monkeypatch):
    from evalprov.provenance import host_record

    made = make_run(tmp_path / "out", "r1", monkeypatch=monkeypatch)
    rec = host_record(made.decision.plan, "h1", None, {})
    assert rec["vllm_version"] is None and "no task ran" in rec["vllm_version_reason"]
    assert rec["model"] is None and rec["model_reason"]
    assert rec["image"]["id"] is None and rec["image"]["reason"]
    failed = host_record(made.decision.plan, "h1", {"instances": {"evalprov-vllm-0": {
        "vllm_version": None, "vllm_version_reason": "/version on port 8000 answered 404"}}},
        {})
    assert failed["vllm_version"] is None
    assert failed["vllm_version_reason"] == "/version on port 8000 answered 404"


def test_gpu_hours_are_the_ledgers_timings_times_the_planned_gpus(tmp_path, monkeypatch):
    made = make_run(tmp_path / "out", "r1", hosts=("h1", "h2"), tp=2, seconds=36.0,
                    monkeypatch=monkeypatch)
    planned = sum(len(i.gpus) for i in made.decision.plan.instances)
    assert planned == 4
    summary = results.load_summary(made.run_dir)
    with Ledger(made.out) as led:
        run = led.run("r1")
        wall = run["finished"] - run["started"]
        assert [d["gpus"] for d in led.deployments_of("r1")] == [2, 2]
        tasks = led.tasks_of("r1")
    assert summary["usage"]["gpus"] == planned
    assert summary["usage"]["gpu_hours"] == pytest.approx(planned * wall / 3600, abs=1e-6)
    for entry in summary["tasks"]:
        row = next(t for t in tasks if (t["host"], t["task"]) == (entry["host"],
                                                                   entry["task"]))
        assert row["seconds"] == 36.0
        assert entry["gpu_hours"] == pytest.approx(2 * 36.0 / 3600, abs=1e-6)
    # status and results show them
    with Ledger(made.out) as led:
        use = gpu_hours(led.run("r1"), led.deployments_of("r1"), led.tasks_of("r1"))
        text = status_text(led.run("r1"), led.deployments_of("r1"), led.task_records("r1"),
                           use)
    header = next(line for line in text.splitlines() if line.startswith("host ") and "task"
                  in line)
    assert header.split()[-2:] == ["gpu-h", "error"]
    assert f"{2 * 36 / 3600:.4f}" in text
    assert text.splitlines()[-1].startswith(f"gpu-hours: {planned * wall / 3600:.4f} (4 GPU")
    table = results.render(summary, "table")
    assert table.splitlines()[0].split()[-1] == "gpu_hours"
    assert table.splitlines()[-1].startswith("gpu-hours: ")
    row = next(csv.DictReader(io.StringIO(results.render(summary, "csv"))))
    assert float(row["gpu_hours"]) == pytest.approx(0.02)


def test_gpu_hours_of_an_instance_without_a_gpu_count_are_unknown_not_zero():
    use = gpu_hours({"started": 0.0, "finished": 3600.0},
                    [{"host": "h", "instance": "i0", "gpus": None}],
                    [{"host": "h", "task": "t", "instance": "i0", "seconds": 60.0}])
    assert use.gpu_hours is None and use.task("h", "t") is None
    use = gpu_hours({"started": 0.0, "finished": 1800.0},
                    [{"host": "h", "instance": "i0", "gpus": 8}],
                    [{"host": "h", "task": "t", "instance": "i0", "seconds": 900.0}])
    assert (use.gpu_hours, use.task("h", "t")) == (4.0, 2.0)


def test_each_host_has_a_timeline_of_its_phases(tmp_path, monkeypatch):
    made = make_run(tmp_path / "out", "r1", hosts=("h1", "h2"), monkeypatch=monkeypatch)
    with Ledger(made.out) as led:
        rows = led.phases_of("r1")
    by = {(r["host"], r["phase"]): r for r in rows}
    assert {p for h, p in by if h == "h1"} == {"probe", "pull", "start", "healthy", "eval",
                                               "fetch"}
    ran = 30.0 * len(made.decision.plan.host("h2").tasks)  # shard: one task each
    for phase, seconds in (("probe", 1), ("pull", 3), ("start", 2), ("healthy", 3),
                           ("eval", ran), ("fetch", 1)):
        r = by[("h2", phase)]
        assert r["finished"] - r["started"] == pytest.approx(seconds, abs=1e-3), phase
        assert r["status"] == "ok"
    summary = results.load_summary(made.run_dir)
    assert len(summary["timeline"]) == len(rows) == 12


def test_compare_puts_scores_side_by_side_with_deltas(tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_run(out, "r1", scores={("h1", "ifeval"): 0.5, ("h1", "gpqa_diamond"): 0.25},
             monkeypatch=monkeypatch)
    make_run(out, "r2", scores={("h1", "ifeval"): 0.75, ("h1", "gpqa_diamond"): 0.125},
             fail=set(), monkeypatch=monkeypatch)
    make_run(out, "r3", fail={("h1", "gpqa_diamond")}, scores={("h1", "ifeval"): 0.5},
             monkeypatch=monkeypatch)
    sums = [results.load_summary(out / r) for r in ("r1", "r2", "r3")]
    data = compare.table(sums)
    assert data["runs"] == ["r1", "r2", "r3"] and not data["by_host"]
    rows = {r["task"]: r for r in data["rows"]}
    assert rows["ifeval"]["scores"] == [0.5, 0.75, 0.5]
    assert rows["ifeval"]["deltas"] == [None, 0.25, 0.0]
    assert rows["gpqa_diamond"]["scores"] == [0.25, 0.125, None]  # failed in r3
    assert rows["gpqa_diamond"]["deltas"] == [None, -0.125, None]
    table = compare.render(data, "table").splitlines()
    assert table[0].split() == ["task", "metric", "r1", "r2", "delta", "r2", "r3", "delta",
                                "r3"]
    ifeval = next(line for line in table if line.startswith("ifeval"))
    assert "+0.2500" in ifeval and "+0.0000" in ifeval
    parsed = list(csv.reader(io.StringIO(compare.render(data, "csv"))))
    assert parsed[0] == ["task", "metric", "r1", "r2", "delta r2", "r3", "delta r3"]
    gpqa = next(r for r in parsed if r[0] == "gpqa_diamond")
    assert gpqa[2:] == ["0.25", "0.125", "-0.125", "", ""]
    md = compare.render(data, "md").splitlines()
    assert md[0] == "| task | metric | r1 | r2 | delta r2 | r3 | delta r3 |"
    assert json.loads(compare.render(data, "json")) == data
    every = compare.table(sums, every_metric=True)
    assert len(every["rows"]) > len(data["rows"])


def test_compare_an_every_host_run_host_by_host(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for run, a, b in (("r1", 0.5, 0.25), ("r2", 0.5, 0.5)):
        make_run(out, run, hosts=("h1", "h2"), tasks=("ifeval",), placement="every_host",
                 scores={("h1", "ifeval"): a, ("h2", "ifeval"): b}, monkeypatch=monkeypatch)
    data = compare.table([results.load_summary(out / r) for r in ("r1", "r2")])
    assert data["by_host"]
    assert [(r["host"], r["deltas"][1]) for r in data["rows"]] == [("h1", 0.0), ("h2", 0.25)]


def test_the_report_shows_the_run_and_escapes_every_value(tmp_path, monkeypatch):
    out = tmp_path / "out"
    made = make_run(out, "r1", hosts=("h1", "h2"), placement="every_host",
                    scores={("h1", "ifeval"): 0.5, ("h2", "ifeval"): 0.75},
                    fail={("h2", "gpqa_diamond")}, log_line=HOSTILE, monkeypatch=monkeypatch)
    html = report.render_html(report.report_data(made.run_dir))
    assert "<script" not in html and "onerror=alert" not in html.replace(
        "onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert "{{7*7}}" in html and ">49<" not in html  # shown, never templated
    assert 'id="timeline"' in html and 'id="chart"' in html and 'id="scores"' in html
    assert re.search(r'data-task="ifeval"\s+data-host="h2"\s+data-score="0.75"', html)
    assert re.search(r'data-task="ifeval"\s+data-host="h1"\s+data-score="0.5"', html)
    assert IMAGE_ID in html and "0.9.1" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert SECRET not in html


def test_report_and_export_json_from_the_command_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    make_run(out, "r1", monkeypatch=monkeypatch)
    assert main(["report", "r1", "--output-dir", str(out)]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(out / "r1" / "report.html")
    page = (out / "r1" / "report.html").read_text()
    assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d · finished \d{4}-", page)
    assert main(["export", "--to", "json", "--output-dir", str(out)]) == 0
    doc = json.loads((out / "r1" / "export.json").read_text())
    assert doc["run"] == "r1" and doc["record"]["vllm_version"] == "0.9.1"
    assert doc["metrics"]["ifeval/prompt_level_strict_acc.prompt_level_strict_acc"] == 0.2
    assert doc["metrics"]["ifeval/gpu_hours"] == pytest.approx(2 * 30 / 3600, abs=1e-6)
    capsys.readouterr()
    assert main(["compare", "r1", "r1", "--output-dir", str(out), "--format", "md"]) == 0
    assert "| ifeval |" in capsys.readouterr().out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,needle", [
    (["report", "nope"], "run 'nope': no run of that name"),
    (["compare", "r1", "nope"], "run 'nope': no run of that name"),
    (["compare", "r1"], "give two runs or more"),
    (["export", "nope", "--to", "json"], "run 'nope': no run of that name"),
    (["export", "r1", "--to", "mlflow"], "no tracking server; give --tracking-uri"),
    (["export", "r1", "--to", "mlflow", "--tracking-uri", "http://127.0.0.1:{port}"],
     "the tracking server http://127.0.0.1:{port} is not reachable"),
])
def test_bad_input_is_one_line_naming_the_thing_and_the_fix(argv, needle, tmp_path,
                                                            monkeypatch, capsys):
    out = tmp_path / "out"
    make_run(out, "r1", monkeypatch=monkeypatch)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = _closed_port()
    capsys.readouterr()
    code = main([a.format(port=port) for a in argv] + ["--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert needle.format(port=port) in err
    assert "Traceback" not in err


def test_export_to_wandb_without_wandb_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    make_run(out, "r1", monkeypatch=monkeypatch)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    capsys.readouterr()
    assert main(["export", "r1", "--to", "wandb", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == ("error: export --to wandb: the wandb package is not "
                                       "installed; install it with `pip install "
                                       "'evalprov[wandb]'`\n")


def test_auto_export_reads_nels_settings_and_reports_each_destination(tmp_path, monkeypatch):
    out = tmp_path / "out"
    made = make_run(out, "r1", monkeypatch=monkeypatch)
    cfg = made.loaded.config.model_copy(deep=True)
    cfg.execution.auto_export = {"destinations": ["json", "gsheets", "mlflow"],
                                 "configs": {"mlflow": {"tracking_uri":
                                                        f"http://127.0.0.1:{_closed_port()}"}}}
    cfg.export = {"mlflow": {"experiment_name": "from-export", "tracking_uri": "ignored"}}
    assert export.settings(cfg, "mlflow")["experiment_name"] == "from-export"
    assert export.settings(cfg, "mlflow")["tracking_uri"].startswith("http://127.0.0.1:")
    lines = export.auto_export(cfg, made.run_dir)
    assert lines[0] == f"auto_export: json: {made.run_dir / 'export.json'}"
    assert "'gsheets' is not supported" in lines[1]
    assert lines[2].startswith("error: auto_export: export --to mlflow: the tracking server")
    assert lines[2].endswith("`evalprov export r1 --to mlflow -c CONFIG`")
    assert len(lines) == 3


def test_a_slurm_jobs_timeline_comes_from_its_submit_and_its_drivers_phases():
    """The job waits in the queue from its submit (the controller's event) until it starts
    on its node; its driver's phases give the server's start, its load and the tasks; a
    phase that ended in failure is marked so; its record facts come with the last look."""
    from evalprov.timeline import Timeline

    class Handler:
        def __call__(self, event):
            return True

    tl = Timeline(Handler())

    def ok(task, res=None, start=None, end=None):
        tl({"event": "runner_on_ok", "event_data": {
            "host": "login", "task": task, "res": res or {},
            "start": start, "end": end}})

    ok("Slurm | Submit the job", {"job": "12"}, "2026-12-02T10:00:00", "2026-12-02T10:00:01")
    t0 = 1_796_205_601.0  # 2026-12-02T10:00:01Z
    job = {"started": t0 + 30, "ended": t0 + 200, "phases": [
        {"phase": "loading", "at": t0 + 31}, {"phase": "evaluating", "at": t0 + 90},
        {"phase": "failed", "at": t0 + 200}]}
    ok("Slurm | Follow the job", {"evalprov_slurm_state": True, "timeline": job,
                                  "provenance": {"vllm_version": "0.11.0"}})
    ok("Slurm | Fetch each task's results and log", {}, "2026-12-02T10:03:21",
       "2026-12-02T10:03:25")
    rows = {phase: (start, end, status) for host, phase, start, end, status in tl.rows()}
    assert rows["queue"] == (t0, t0 + 30, "ok")
    assert rows["start"] == (t0 + 30, t0 + 31, "ok")
    assert rows["healthy"] == (t0 + 31, t0 + 90, "ok")
    assert rows["eval"] == (t0 + 90, t0 + 200, "failed")
    assert rows["fetch"][2] == "ok" and rows["fetch"][0] == t0 + 200
    assert tl.provenance["login"] == {"vllm_version": "0.11.0"}
