"""NEL's auxiliary_deployments (e.g. a judge served beside the model under test) are planned
like the main deployment (GPUs, port, exact argv) and shown by `evalprov plan`; serving them
is later work, which the loader's warning says."""

from __future__ import annotations

from pathlib import Path

from evalprov.config.loader import load_config
from evalprov.hosts import host_facts
from evalprov.plan import plan
from evalprov.show import plan_text

DATA = Path(__file__).resolve().parents[1] / "data" / "nel_generations"


def planned(name: str):
    loaded = load_config(DATA / name)
    config = loaded.config
    return loaded, plan(config, host_facts(config.execution.type, None, gpus=8))


def test_a_judge_is_planned_like_a_second_deployment_and_shown():
    loaded, p = planned("v0_2_4_aux_judge.yaml")
    (aux,) = p.auxiliary
    judge = loaded.config.auxiliary_deployments["judge"]
    assert aux.name == "judge" and aux.served_model_name == judge.served_model_name
    assert aux.gpus == (judge.tensor_parallel_size * judge.pipeline_parallel_size
                        * judge.data_parallel_size)
    assert aux.argv[:2] == ("vllm", "serve")
    assert aux.argv[aux.argv.index("--port") + 1] == str(judge.port)
    assert aux.argv[aux.argv.index("--served-model-name") + 1] == judge.served_model_name
    text = plan_text(p)
    assert "auxiliary judge (planned, not served by evalprov yet)" in text
    assert any("auxiliary_deployments.judge" in w for w in loaded.warnings)


def test_an_auxiliary_of_type_none_plans_nothing():
    _, p = planned("v0_2_4_aux_none.yaml")
    assert p.auxiliary == ()
