"""evalprov_health on a fleet host: after converge every planned instance answers /health and
lists the served model on /v1/models, asked on the host itself."""

import json
from pathlib import Path

import pytest
import yaml

HOST_VARS = yaml.safe_load(
    (Path(__file__).resolve().parents[9] / "tests/molecule/host_vars.yml").read_text()
)
INSTANCES = HOST_VARS["evalprov_molecule_instances"]


@pytest.mark.parametrize("inst", INSTANCES, ids=lambda i: i["name"])
def test_instance_is_healthy_and_serves_the_model(host, inst):
    base = f"http://127.0.0.1:{inst['port']}"
    path = HOST_VARS["evalprov_health_path"]
    health = host.run(f"curl -s -o /dev/null -w '%{{http_code}}' {base}{path}")
    assert health.stdout == "200", health.stdout + health.stderr
    models = json.loads(host.check_output(f"curl -sf {base}/v1/models"))
    assert [m["id"] for m in models["data"]] == [HOST_VARS["evalprov_health_served_model_name"]]
