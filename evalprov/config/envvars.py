"""env_vars values as NEL configs write them, and their resolution at apply time.

A value is one of:
- ``NAME`` or ``host:NAME``: read NAME from the controller's environment at apply time;
- ``lit:VALUE``: the literal VALUE;
- ``runtime:NAME``: passed through, resolved on the host when the task runs.
Values are never printed: only names and sources are.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from evalprov.errors import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")  # used with fullmatch


@dataclass(frozen=True)
class EnvVarSpec:
    source: Literal["host", "lit", "runtime"]
    ref: str  # NAME for host/runtime, the literal for lit

    def describe(self) -> str:
        """A printable form that never contains a literal's value."""
        return "lit:<literal>" if self.source == "lit" else f"{self.source}:{self.ref}"


def parse_env_value(raw: Any) -> EnvVarSpec:
    if isinstance(raw, EnvVarSpec):
        return raw
    if raw is None or isinstance(raw, (dict, list)):
        raise ValueError(
            "env var value must be NAME, host:NAME, lit:VALUE or runtime:NAME; got a "
            f"{type(raw).__name__}"
        )
    text = str(raw)
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("host", "runtime"):
        if not _NAME.fullmatch(rest):
            raise ValueError(f"{prefix}: needs a variable name after it; use {prefix}:NAME")
        return EnvVarSpec(prefix, rest)  # type: ignore[arg-type]
    if sep and prefix == "lit":
        return EnvVarSpec("lit", rest)
    if _NAME.fullmatch(text):
        return EnvVarSpec("host", text)
    raise ValueError(
        "env var value is neither a variable name nor prefixed; write host:NAME to read NAME "
        "on the controller or lit:VALUE for a literal"
    )


def resolve_env(specs: dict[str, EnvVarSpec], where: str, environ=None) -> dict[str, str]:
    """Values for the host/lit entries (runtime ones are left to the host).

    Raises ConfigError naming each missing controller variable and ``where`` it is used.
    """
    environ = os.environ if environ is None else environ
    values, missing = {}, []
    for name, spec in specs.items():
        if spec.source == "lit":
            values[name] = spec.ref
        elif spec.source == "host":
            if spec.ref in environ:
                values[name] = environ[spec.ref]
            else:
                missing.append(
                    f"{where}: env var {name} reads {spec.ref} from the controller environment, "
                    f"which is not set; export {spec.ref}=... before running evalprov"
                )
    if missing:
        raise ConfigError(*missing)
    return values
