"""evalprov test fleet: fake GPU hosts (netns + sshd + dockerd) on one machine.

    from tests.testbed import Fleet
    with Fleet([8, 4, 2], docker=True) as fleet:
        ansible_runner.run(inventory=fleet.inventory(), ...)

``Fleet(..., net=79)`` puts a fleet on 10.213.79.0/24 (default: $EVALPROV_TESTBED_NET or
77) so that several fleets can run at once.

CLI: ``python -m tests.testbed up|down|status|image ... [--net N]`` (see __main__.py).
"""

from .fleet import (
    BRIDGE,
    CONTROLLER_IP,
    DEFAULT_NET,
    NET_ENV,
    REGISTRY_ADDR,
    Fleet,
    Host,
    cleanup_stale,
    default_net,
)
from .image import STANDIN_IMAGE, STANDIN_REGISTRY_REF, ensure_standin_image
from .util import TestbedError

__all__ = [
    "BRIDGE",
    "CONTROLLER_IP",
    "DEFAULT_NET",
    "NET_ENV",
    "REGISTRY_ADDR",
    "STANDIN_IMAGE",
    "STANDIN_REGISTRY_REF",
    "Fleet",
    "Host",
    "TestbedError",
    "cleanup_stale",
    "default_net",
    "ensure_standin_image",
]
