"""One error path to the user: domain errors carry one line each and an exit code."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """Process exit codes (DESIGN.md)."""

    OK = 0
    FAILED = 1  # some host or task failed; named in the output
    USAGE = 2  # invalid config, inventory or command line
    INTERRUPTED = 130


class EvalprovError(Exception):
    """An error a user can fix. Each entry of ``lines`` is one complete message:
    what (field path), the value, and what to do."""

    exit_code = Exit.USAGE

    def __init__(self, *lines: str) -> None:
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class ConfigError(EvalprovError):
    """Invalid config (or override): field path, value and fix."""


class InventoryError(EvalprovError):
    """Invalid inventory or host facts."""


class PlanError(EvalprovError):
    """The config does not fit the hosts (GPU arithmetic, ports). ``hosts``: the hosts the
    plan could not be made for, when the error is theirs alone (the others' plan can be)."""

    def __init__(self, *lines: str, hosts: tuple[str, ...] = ()) -> None:
        super().__init__(*lines)
        self.hosts = tuple(hosts)
