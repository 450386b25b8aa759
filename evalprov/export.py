"""`evalprov export RUN --to json|mlflow|wandb`, and NEL's `execution.auto_export` after
`evalprov apply`.

- json: one document (the run's summary with its record, usage and timeline), written
  atomically.
- mlflow: through the tracking server's REST API (requests; no mlflow package in evalprov):
  an experiment (created if missing), one MLflow run tagged `evalprov.run` (an evalprov run
  already exported there is not exported twice), every score as a metric, the record's
  facts as params, and the report, summary.json and logs as artifacts through the server's
  artifact proxy (`mlflow-artifacts`). MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME /
  MLFLOW_TRACKING_PASSWORD authenticate, as the mlflow client does.
- wandb: the wandb SDK (the optional extra evalprov[wandb]); WANDB_MODE=offline (or
  `mode: offline` in the settings) writes the run directory without a network.

Settings, as NEL writes them: `execution.auto_export: {destinations: [mlflow, wandb],
configs: {mlflow: {tracking_uri, experiment_name, tags, description, log_artifacts,
log_metrics}, wandb: {entity, project, name, tags, mode, dir}}}`, or a top-level
`export: {mlflow: {...}, wandb: {...}}`; auto_export's configs win over `export:`; the
command line wins over both."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from evalprov.errors import EvalprovError
from evalprov.results import SUMMARY, load_summary, records, write_atomic

DESTINATIONS = ("json", "mlflow", "wandb")
TIMEOUT = (5.0, 60.0)  # connect, read seconds of every MLflow request
MAX_PARAM = 6000  # MLflow's limit on a param value
MAX_BATCH_METRICS = 1000


# --------------------------------------------------------------------------- settings


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def settings(config: Any, dest: str) -> dict[str, Any]:
    """The config's settings for one destination (read defensively: NEL's shapes vary)."""
    if config is None:
        return {}
    out = _mapping(_mapping(getattr(config, "export", None)).get(dest))
    auto = _mapping(getattr(getattr(config, "execution", None), "auto_export", None))
    out.update(_mapping(_mapping(auto.get("configs")).get(dest)))
    return out


def auto_destinations(config: Any) -> list[str]:
    """execution.auto_export.destinations (NEL), in order, only the known ones."""
    auto = _mapping(getattr(getattr(config, "execution", None), "auto_export", None))
    dests = auto.get("destinations") or []
    if isinstance(dests, str):
        dests = [dests]
    return [str(d) for d in dests if isinstance(d, str)]


# --------------------------------------------------------------------------- what is exported


def metrics(summary: dict[str, Any], only: list[str] | None = None) -> dict[str, float]:
    """Every score of every succeeded task: `<task>/<metric>.<name>` (with the host in front
    when the run has several), plus each task's GPU-hours and seconds. only: substrings a
    metric name must contain (NEL's log_metrics)."""
    recs = records(summary)
    many = len({r.host for r in recs}) > 1
    out: dict[str, float] = {}
    for r in recs:
        prefix = f"{r.host}/{r.task}" if many else r.task
        if r.succeeded:
            for s in r.scores or ([r.primary] if r.primary else []):
                if isinstance(s, dict) and isinstance(s.get("score"), int | float):
                    name = f"{s.get('metric')}.{s.get('name')}"
                    if only and not any(o in name for o in only):
                        continue
                    out[_key(f"{prefix}/{name}")] = float(s["score"])
        for extra, value in (("seconds", r.seconds), ("gpu_hours", r.extra.get("gpu_hours"))):
            if isinstance(value, int | float) and not r.reused_from:
                out[_key(f"{prefix}/{extra}")] = float(value)
    use = summary.get("usage") or {}
    if isinstance(use.get("gpu_hours"), int | float):
        out["run/gpu_hours"] = float(use["gpu_hours"])
    return out


def _key(text: str) -> str:
    """A metric or param key MLflow accepts (alphanumerics, _ - . space /)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)[:250]


def params(summary: dict[str, Any]) -> dict[str, str]:
    rec = summary.get("record") or {}
    model = rec.get("model_source") or {}
    out = {
        "evalprov.run": summary["run"],
        "evalprov.version": rec.get("evalprov_version"),
        "served_model_name": summary.get("served_model_name") or rec.get("served_model_name"),
        "config": rec.get("config_source") or summary.get("config"),
        "config_sha256": rec.get("config_sha256"),
        "runtime": rec.get("runtime"),
        "image": rec.get("image"),
        "vllm_version": rec.get("vllm_version"),
        "model_source": f"{model.get('kind')} {model.get('ref')}" if model else None,
        "hosts": ",".join(summary.get("hosts") or []),
        "argv": " ".join(rec.get("argv") or []),
    }
    for host, h in (rec.get("hosts") or {}).items():
        image = h.get("image") or {}
        if image.get("id"):
            out[f"{host}.image_id"] = image["id"]
        m = h.get("model") or {}
        if m.get("sha256") or m.get("revision"):
            out[f"{host}.model"] = m.get("sha256") or m.get("revision")
    return {_key(k): str(v)[:MAX_PARAM] for k, v in out.items() if v not in (None, "")}


def artifacts(run_dir: Path) -> list[tuple[Path, str]]:
    """(file, artifact path): the report, summary.json and every log of the run."""
    from evalprov.report import write_report

    report = write_report(run_dir)
    out = [(report, "report.html"), (run_dir / SUMMARY, SUMMARY)]
    for log in sorted(run_dir.glob("*/*/logs/harness.log")):
        out.append((log, f"logs/{log.parent.parent.parent.name}/{log.parent.parent.name}/"
                         "harness.log"))
    for log in sorted((run_dir / "logs").glob("*/*.log")):
        out.append((log, f"logs/{log.parent.name}/{log.name}"))
    return out


def document(summary: dict[str, Any]) -> dict[str, Any]:
    return {"format": "evalprov-export/1", **summary, "metrics": metrics(summary)}


# --------------------------------------------------------------------------- json


def to_json(run_dir: Path, out: Path | None = None) -> str:
    summary = load_summary(run_dir)
    path = out or run_dir / "export.json"
    write_atomic(path, json.dumps(document(summary), indent=2, default=str))
    return str(path)


# --------------------------------------------------------------------------- mlflow


class MlflowRest:
    """The few MLflow REST calls an export makes, each bounded by TIMEOUT."""

    def __init__(self, uri: str) -> None:
        import requests

        self.uri = uri.rstrip("/")
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy from the environment: only the given server
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"
        elif user:
            self.http.auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))

    def _fail(self, what: str, why: str) -> EvalprovError:
        return EvalprovError(f"export --to mlflow: {what} at {self.uri} failed ({why}); check "
                             "the tracking server (--tracking-uri or export.mlflow.tracking_uri)")

    def call(self, method: str, path: str, ok404: bool = False, **kw: Any) -> dict[str, Any]:
        import requests

        try:
            resp = self.http.request(method, f"{self.uri}{path}", timeout=TIMEOUT, **kw)
        except requests.ConnectionError:
            raise EvalprovError(
                f"export --to mlflow: the tracking server {self.uri} is not reachable; start "
                "it or fix --tracking-uri (or export.mlflow.tracking_uri)") from None
        except requests.Timeout:
            raise self._fail(path, f"no answer in {TIMEOUT[1]:g} s") from None
        except requests.RequestException as exc:
            raise self._fail(path, type(exc).__name__) from None
        if ok404 and resp.status_code == 404:
            return {}
        if resp.status_code >= 400:
            try:
                msg = resp.json().get("message") or resp.text
            except ValueError:
                msg = resp.text
            raise self._fail(path, f"HTTP {resp.status_code}: {str(msg)[:200]}")
        try:
            return resp.json() if resp.content else {}
        except ValueError:
            raise self._fail(path, "the answer is not JSON: is this an MLflow server?"
                             ) from None

    def experiment(self, name: str) -> str:
        got = self.call("GET", "/api/2.0/mlflow/experiments/get-by-name", ok404=True,
                        params={"experiment_name": name})
        if got.get("experiment"):
            return str(got["experiment"]["experiment_id"])
        return str(self.call("POST", "/api/2.0/mlflow/experiments/create",
                             json={"name": name})["experiment_id"])

    def find_run(self, experiment_id: str, evalprov_run: str) -> str | None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", evalprov_run):
            return None  # not an id evalprov makes: nothing to quote into a filter
        got = self.call("POST", "/api/2.0/mlflow/runs/search", json={
            "experiment_ids": [experiment_id], "max_results": 1,
            "filter": f"tags.`evalprov.run` = '{evalprov_run}'"})
        runs = got.get("runs") or []
        return runs[0]["info"]["run_id"] if runs else None

    def upload(self, artifact_uri: str, path: Path, name: str) -> None:
        prefix = artifact_uri.removeprefix("mlflow-artifacts:").lstrip("/")
        with path.open("rb") as f:
            self.call("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{prefix}/{name}", data=f)


def to_mlflow(run_dir: Path, cfg: dict[str, Any]) -> str:
    summary = load_summary(run_dir)
    uri = cfg.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not str(uri).startswith(("http://", "https://")):
        raise EvalprovError("export --to mlflow: no tracking server; give --tracking-uri "
                            "http://HOST:PORT (or export.mlflow.tracking_uri, or "
                            "MLFLOW_TRACKING_URI)")
    api = MlflowRest(str(uri))
    exp = api.experiment(str(cfg.get("experiment_name") or "evalprov"))
    run_id = summary["run"]
    found = api.find_run(exp, run_id)
    if found:
        return f"{uri} experiment {exp} run {found} (exported before; not again)"
    now = int(time.time() * 1000)
    tags = [{"key": "evalprov.run", "value": run_id},
            {"key": "mlflow.runName", "value": run_id}]
    if cfg.get("description"):
        tags.append({"key": "mlflow.note.content", "value": str(cfg["description"])})
    tags += [{"key": _key(str(k)), "value": str(v)[:MAX_PARAM]}
             for k, v in _mapping(cfg.get("tags")).items()]
    created = api.call("POST", "/api/2.0/mlflow/runs/create", json={
        "experiment_id": exp, "start_time": now, "run_name": run_id, "tags": tags})
    info = created["run"]["info"]
    mlflow_run = info["run_id"]
    only = cfg.get("log_metrics")
    values = metrics(summary, list(only) if isinstance(only, list) and only else None)
    items = [{"key": k, "value": v, "timestamp": now, "step": 0} for k, v in values.items()]
    extra = _mapping(cfg.get("extra_metadata"))
    prm = {**params(summary), **{_key(str(k)): str(v)[:MAX_PARAM] for k, v in extra.items()}}
    plist = [{"key": k, "value": v} for k, v in prm.items()]
    for i in range(0, max(len(items), len(plist), 1), 100):
        api.call("POST", "/api/2.0/mlflow/runs/log-batch", json={
            "run_id": mlflow_run, "metrics": items[i:i + 100], "params": plist[i:i + 100]})
    skipped = ""
    if cfg.get("log_artifacts", True):
        uri_a = str(info.get("artifact_uri") or "")
        if uri_a.startswith("mlflow-artifacts:"):
            for path, name in artifacts(run_dir):
                if path.is_file():
                    api.upload(uri_a, path, name)
        else:
            skipped = (f"; artifacts not uploaded: the server stores them at {uri_a}, not "
                       "through its artifact proxy (start it with --serve-artifacts)")
    ok = all(r.succeeded for r in records(summary))
    api.call("POST", "/api/2.0/mlflow/runs/update", json={
        "run_id": mlflow_run, "status": "FINISHED" if ok else "FAILED",
        "end_time": int(time.time() * 1000)})
    return f"{uri} experiment {exp} run {mlflow_run}{skipped}"


# --------------------------------------------------------------------------- wandb


def to_wandb(run_dir: Path, cfg: dict[str, Any]) -> str:
    try:
        import wandb
    except ImportError:
        raise EvalprovError("export --to wandb: the wandb package is not installed; install "
                            "it with `pip install 'evalprov[wandb]'`") from None
    summary = load_summary(run_dir)
    mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or "online"
    root = Path(cfg.get("dir") or run_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=str(cfg.get("project") or "evalprov"), entity=cfg.get("entity"),
            name=str(cfg.get("name") or summary["run"]), dir=str(root), mode=mode,
            tags=[str(t) for t in cfg.get("tags") or []] or None,
            config={"evalprov": params(summary), "record": summary.get("record")},
            settings=wandb.Settings(init_timeout=120, silent=True, x_disable_stats=True,
                                    disable_git=True, save_code=False, console="off"))
    except Exception as exc:  # wandb raises its own types for login, network and settings
        raise EvalprovError(f"export --to wandb: wandb.init failed ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); for no network set WANDB_MODE=offline"
                            ) from None
    try:
        run.summary.update(metrics(summary))
        art = wandb.Artifact(f"evalprov-{summary['run']}", type="evaluation")
        for path, name in artifacts(run_dir):
            if path.is_file():
                art.add_file(str(path), name=name)
        run.log_artifact(art)
        where = run.dir
    finally:
        run.finish()
    return f"wandb run {run.id} ({mode}): {Path(where).parent}"


# --------------------------------------------------------------------------- one entry


def export(run_dir: Path, dest: str, cfg: dict[str, Any] | None = None,
           out: Path | None = None) -> str:
    """Export one run to one destination; returns where it went (one line)."""
    cfg = cfg or {}
    if dest == "json":
        return to_json(run_dir, out)
    if dest == "mlflow":
        return to_mlflow(run_dir, cfg)
    if dest == "wandb":
        return to_wandb(run_dir, cfg)
    raise EvalprovError(f"export: unknown destination {dest!r}; one of "
                        f"{', '.join(DESTINATIONS)}")


def auto_export(config: Any, run_dir: Path) -> list[str]:
    """NEL's execution.auto_export after a run: each destination in turn; a failure is one
    line naming it and how to export again, and does not stop the others."""
    lines = []
    for dest in auto_destinations(config):
        if dest not in DESTINATIONS:
            lines.append(f"warning: auto_export: destination {dest!r} is not supported by "
                         f"evalprov (it exports to {', '.join(DESTINATIONS)})")
            continue
        try:
            lines.append(f"auto_export: {dest}: {export(run_dir, dest, settings(config, dest))}")
        except EvalprovError as exc:
            lines.extend(f"error: auto_export: {line}; export again with `evalprov export "
                         f"{run_dir.name} --to {dest} -c CONFIG`" for line in exc.lines)
    return lines
