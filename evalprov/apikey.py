"""The API key of a deployment whose vLLM API is reachable beyond loopback.

When `deployment.host` opens the API (0.0.0.0 or ::), vLLM must require a key, and every
client evalprov starts (the probe's and the health role's /v1/models, the harness) must send
it. The key is evalprov's own, one per deployment (a deployment is an output_dir on a
controller: `apply.owner_id`):

    key = HMAC-SHA256(controller secret, "evalprov vllm api key" + owner)

The controller secret is 32 random bytes in `$XDG_CONFIG_HOME/evalprov/secret` (default
~/.config/evalprov/secret), mode 0600 in a 0700 directory, made on first need. Deriving the
key rather than storing it keeps every credential out of the output_dir, which is what
people share, copy and export (results, report, logs, the ledger): nothing under it can
open a server. The key is stable for as long as the secret file is (every apply of the same
output_dir gets the same key, so converged instances stay untouched); deleting the secret
rotates the key of every deployment of this controller, and the next apply recreates their
instances (the key's fingerprint is part of each instance's spec hash).

A key a user gives vLLM themselves (`deployment.env_vars.VLLM_API_KEY`) is used instead, on
loopback too: the clients must send whichever key the server requires.

The value travels like every other secret: in memory to ansible-playbook, to vLLM only as
VLLM_API_KEY in its environment (`--api-key` on argv is refused), to the harness as the
variable its run config names (`target.api_endpoint.api_key_name`), never into a file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from evalprov.config.models import Config, SlurmExecution, VllmDeployment
from evalprov.errors import ConfigError

# What vLLM reads its key from, and what the harness is told to read it from.
VLLM_ENV = "VLLM_API_KEY"
HARNESS_ENV = "EVALPROV_API_KEY"


def secret_path(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "evalprov" / "secret"


def needed(config: Config) -> bool:
    """Whether the deployment's API is opened beyond loopback (then evalprov keys it): by
    deployment.host, or on Slurm by instances on other nodes than the batch node's (the
    proxy there reaches them over the cluster's network)."""
    dep = config.deployment
    if not isinstance(dep, VllmDeployment):
        return False
    if isinstance(config.execution, SlurmExecution):
        return config.execution.num_instances > 1
    return dep.exposed


def keyed(config: Config) -> bool:
    """Whether the servers require a key (opened, or the user gives vLLM one): then the
    harness and the health checks send it."""
    dep = config.deployment
    return isinstance(dep, VllmDeployment) and (
        needed(config) or VLLM_ENV in {**config.env_vars, **dep.env_vars})


def controller_secret(path: Path | None = None) -> bytes:
    """The controller's secret (made now if there is none): refused when others can read it
    or it is not a regular file of this user."""
    path = path or secret_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read evalprov's controller secret ({exc.strerror}); "
                          "remove it (a new one is made, and the API keys change)") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ConfigError(f"{path}: evalprov's controller secret is not a regular file of "
                              "this user; remove it (a new one is made)")
        if st.st_mode & 0o077:
            raise ConfigError(f"{path}: evalprov's controller secret has mode "
                              f"{stat.S_IMODE(st.st_mode):04o}, readable by others; "
                              f"chmod 600 {path}")
        value = f.read().strip()
    if len(value) < 32:
        raise ConfigError(f"{path}: evalprov's controller secret is too short; remove it (a "
                          "new one is made)")
    return value.encode()


def derive(secret: bytes, owner: str) -> str:
    return hmac.new(secret, b"evalprov vllm api key\0" + owner.encode(),
                    hashlib.sha256).hexdigest()


def fingerprint(key: str) -> str:
    """What identifies a key in an instance's spec hash (reveals nothing of the key)."""
    return hashlib.sha256(b"evalprov api key fingerprint\0" + key.encode()).hexdigest()[:16]


def deployment_key(config: Config, owner: str, deployment_env: dict[str, str],
                   path: Path | None = None) -> str | None:
    """The key the deployment's servers require (None: no key): the user's VLLM_API_KEY,
    else evalprov's own when the API is opened."""
    if not keyed(config):
        return None
    if deployment_env.get(VLLM_ENV):
        return deployment_env[VLLM_ENV]
    if not needed(config):
        return None
    return derive(controller_secret(path), owner)
