"""CLI for the evalprov test fleet.

    python -m tests.testbed up [--gpus 8,4,2] [--no-docker] [--dir DIR] [--image]
                               [--inventory PATH] [--net N]
    python -m tests.testbed status [--dir DIR] [--net N]
    python -m tests.testbed down [--dir DIR] [--net N] [--rm]  (no state: removes leftovers)
    python -m tests.testbed image [--dir DIR] [--net N] [--force]  (build+push the stand-in)
    python -m tests.testbed eval-image [--dir DIR] [--net N] [--force]  (the harness image)
    python -m tests.testbed kill|revive|disconnect|reconnect HOST [--dir DIR] [--net N]

The hosts keep running after ``up`` returns; ``down`` finds them again through
DIR/state.json. ``--net N`` (default $EVALPROV_TESTBED_NET or 77) puts the fleet on
10.213.N.0/24, so fleets with different nets run side by side; the default DIR is
/tmp/evalprov-fleet for net 77 and /tmp/evalprov-fleet-N for any other net.

    python -m tests.testbed up --net 79 --gpus 4 --image --inventory /tmp/inv.yml
    python -m tests.testbed down --net 79 --rm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .fleet import DEFAULT_NET, Fleet, check_net, cleanup_stale, default_net
from .image import ensure_standin_image
from .util import TestbedError

DEFAULT_DIR = "/tmp/evalprov-fleet"


def default_dir(net: int) -> str:
    """The fleet dir of ``net`` when --dir is not given."""
    return DEFAULT_DIR if net == DEFAULT_NET else f"{DEFAULT_DIR}-{net}"


def _net(text: str) -> int:
    try:
        return check_net(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _gpus(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected e.g. 8,4,2") from exc
    if not out or any(k < 0 for k in out):
        raise argparse.ArgumentTypeError("expected one non-negative GPU count per host")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring a fleet up (hosts keep running)")
    up.add_argument("--gpus", type=_gpus, default=[8, 4, 2], help="GPUs per host, e.g. 8,4,2")
    up.add_argument("--no-docker", dest="docker", action="store_false")
    up.add_argument("--image", action="store_true", help="also ensure the stand-in image")
    up.add_argument("--inventory", help="write the Ansible inventory YAML here")
    down = sub.add_parser("down", help="tear the fleet down")
    down.add_argument("--rm", action="store_true", help="also delete the fleet dir")
    sub.add_parser("status", help="show the fleet")
    img = sub.add_parser("image", help="build/push the stand-in vLLM image if missing")
    img.add_argument("--force", action="store_true")
    eimg = sub.add_parser("eval-image", help="build/push the nemo-evaluator harness image")
    eimg.add_argument("--force", action="store_true")
    for verb in ("kill", "revive", "disconnect", "reconnect"):
        sp = sub.add_parser(verb, help=f"{verb} one host")
        sp.add_argument("host")
    try:
        net_default = default_net()
    except ValueError as exc:
        p.error(str(exc))
    for sp in sub.choices.values():
        sp.add_argument(
            "--net",
            type=_net,
            default=net_default,
            help="third octet of the fleet's subnet 10.213.N.0/24 "
            f"(default ${{EVALPROV_TESTBED_NET}} or {DEFAULT_NET}: {net_default})",
        )
        sp.add_argument(
            "--dir",
            help=f"fleet dir (default {DEFAULT_DIR} for net {DEFAULT_NET}, else {DEFAULT_DIR}-N)",
        )
    args = p.parse_args(argv)
    if args.dir is None:
        args.dir = default_dir(args.net)

    if os.geteuid() != 0:
        print("the testbed needs root", file=sys.stderr)
        return 2
    state = Path(args.dir) / "state.json"
    try:
        if args.cmd == "up":
            if state.exists():
                with contextlib.suppress(TestbedError, OSError, ValueError, KeyError):
                    Fleet.attach(args.dir).down()
            fleet = Fleet(args.gpus, docker=args.docker, workdir=args.dir, net=args.net).up()
            inv = fleet.write_inventory(args.inventory)
            out = {"up_s": round(fleet.timings["up"], 3), "inventory": str(inv)}
            if args.image:
                out["image"] = ensure_standin_image(fleet)
            out["status"] = fleet.status()
            print(json.dumps(out, indent=2))
        elif args.cmd == "down":
            if state.exists():
                fleet = Fleet.attach(args.dir)
                fleet.down(remove_workdir=args.rm)
                print(json.dumps({"down_s": round(fleet.timings["down"], 3)}))
            else:
                print(json.dumps({"removed_stale": cleanup_stale(args.net)}))
        elif args.cmd == "status":
            if not state.exists():
                print(json.dumps({"workdir": args.dir, "up": False}))
            else:
                print(json.dumps(Fleet.attach(args.dir).status(), indent=2))
        elif args.cmd == "image":
            print(
                json.dumps(ensure_standin_image(Fleet.attach(args.dir), force=args.force), indent=2)
            )
        elif args.cmd == "eval-image":
            from .eval_image import eval_image_info

            print(json.dumps(eval_image_info(Fleet.attach(args.dir), force=args.force), indent=2))
        else:
            fleet = Fleet.attach(args.dir)
            getattr(fleet, f"{args.cmd}_host")(args.host)
            print(json.dumps(fleet.status()["hosts"][fleet.host(args.host).name]))
    except TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
