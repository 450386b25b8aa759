"""The collection's module_utils and modules as Python modules for unit tests. Only
ansible_collections/ goes on sys.path (through a directory of its own: the package directory
itself would shadow stdlib modules such as `secrets` for every later test)."""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "evalprov"
_ROOT = Path(tempfile.mkdtemp(prefix="evalprov-collections-"))
(_ROOT / "ansible_collections").symlink_to(PKG / "ansible_collections")
sys.path.append(str(_ROOT))


def module(name: str):
    """e.g. module("module_utils.evalprov_host") or module("modules.evalprov_wait_health")."""
    return importlib.import_module(f"ansible_collections.evalprov.fleet.plugins.{name}")
