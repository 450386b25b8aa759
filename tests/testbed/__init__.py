"""evalprov test fleet: fake GPU hosts (netns + sshd + dockerd) on one machine.

    from tests.testbed import Fleet
    with Fleet([8, 4, 2], docker=True) as fleet:
        ansible_runner.run(inventory=fleet.inventory(), ...)

CLI: ``python -m tests.testbed up|down|status|image ...`` (see __main__.py).
"""

from .fleet import (
    BRIDGE,
    CONTROLLER_IP,
    REGISTRY_ADDR,
    Fleet,
    Host,
    cleanup_stale,
)
from .image import STANDIN_IMAGE, STANDIN_REGISTRY_REF, ensure_standin_image
from .util import TestbedError

__all__ = [
    "BRIDGE",
    "CONTROLLER_IP",
    "REGISTRY_ADDR",
    "STANDIN_IMAGE",
    "STANDIN_REGISTRY_REF",
    "Fleet",
    "Host",
    "TestbedError",
    "cleanup_stale",
    "ensure_standin_image",
]
