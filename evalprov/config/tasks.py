"""The packaged task table: which harness and container image run a task.

Generated from NEL 0.2.6's task metadata by tools/gen_task_table.py (421 tasks, 23 harnesses).
A bare name resolves to the first harness (in NEL's mapping order) that defines it;
``harness.task`` picks one explicitly.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from evalprov.config.safeyaml import load_text
from evalprov.errors import ConfigError


@dataclass(frozen=True)
class TaskInfo:
    name: str
    harness: str
    container: str
    endpoint_types: tuple[str, ...]
    description: str = ""

    @property
    def qualified(self) -> str:
        return f"{self.harness}.{self.name}"


@dataclass(frozen=True)
class TaskTable:
    tasks: tuple[TaskInfo, ...]
    harnesses: dict[str, str]

    def candidates(self, name: str) -> list[TaskInfo]:
        return [t for t in self.tasks if t.name == name]

    def resolve(self, name: str, container: str | None, field: str) -> TaskInfo:
        """TaskInfo for a bare or harness-qualified name; ConfigError with close matches."""
        harness, dot, bare = name.rpartition(".")
        if dot and harness in self.harnesses:
            found = [t for t in self.candidates(bare) if t.harness == harness]
            if found:
                return found[0]
            if container:  # an explicit image may run a task the table does not know
                return TaskInfo(bare, harness, container, ("chat",))
            raise ConfigError(self._unknown(name, field, f"harness {harness} has no task {bare}"))
        found = self.candidates(name)
        if found:
            return found[0]
        if dot and container:
            return TaskInfo(bare, harness, container, ("chat",))
        raise ConfigError(self._unknown(name, field, "not in the task table"))

    def _unknown(self, name: str, field: str, why: str) -> str:
        names = sorted({t.name for t in self.tasks} | {t.qualified for t in self.tasks})
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see `evalprov ls tasks`"
        return (
            f"{field}: unknown task {name!r} ({why}); {hint} "
            "(an unlisted task needs harness.task and a container:)"
        )


@lru_cache(maxsize=1)
def task_table() -> TaskTable:
    text = resources.files("evalprov.config").joinpath("tasks.yaml").read_text()
    data = load_text(text, source="packaged tasks.yaml")
    harnesses = dict(data["harnesses"])
    tasks = tuple(
        TaskInfo(
            name=t["name"],
            harness=t["harness"],
            container=harnesses[t["harness"]],
            endpoint_types=tuple(t["endpoint_types"]),
            description=t.get("description", ""),
        )
        for t in data["tasks"]
    )
    return TaskTable(tasks, harnesses)
