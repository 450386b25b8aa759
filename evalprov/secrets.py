"""What is a secret: every value read from the controller's environment (host:NAME, or a bare
NAME), and a literal (lit:VALUE) whose variable name says it is one (token, key, secret,
password, credential, auth). Secrets travel only in memory and are masked in Ansible's
output; every other literal is plain configuration: it is part of the plan, of the spec
hash, and shown as it is (so a value like `1` is never masked in `--diff` output)."""

from __future__ import annotations

import re

from evalprov.config.envvars import EnvVarSpec

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION",
                         re.IGNORECASE)


def is_secret(name: str, spec: EnvVarSpec) -> bool:
    if spec.source == "host":
        return True
    return spec.source == "lit" and bool(SECRET_NAME.search(name))


def plain_literals(specs: dict[str, EnvVarSpec]) -> dict[str, str]:
    """The literals that are not secrets, name -> value."""
    return {k: s.ref for k, s in specs.items() if s.source == "lit" and not is_secret(k, s)}


def secret_specs(specs: dict[str, EnvVarSpec]) -> dict[str, EnvVarSpec]:
    return {k: s for k, s in specs.items() if is_secret(k, s)}
