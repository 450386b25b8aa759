#!/usr/bin/env bash
# Install the Debian packages the evalprov test fleet (tests/testbed) needs.
# Idempotent: does nothing when everything is already installed; otherwise runs
# `apt-get update` once and installs what is missing. Never starts services
# (a temporary policy-rc.d forbids it; the testbed starts its own daemons).
set -euo pipefail

PKGS=(
  openssh-server     # sshd on every fake host
  openssh-client     # ssh from the controller (ansible, ssh -O exit)
  tini               # PID 1 of every fake host
  docker.io          # dockerd on the fake hosts, docker CLI for import/push
  docker-registry    # local registry = Docker Hub mirror on 10.213.77.1:5000
  busybox-static     # shell + tools inside the stand-in vLLM image
  python3            # /usr/bin/python3: ansible_python_interpreter on the hosts
  python3-requests   # community.docker modules need it on the target
  iproute2           # ip netns / veth / bridge
  iptables           # dockerd inside each fake host
  util-linux         # nsenter, unshare
  procps             # ps/pgrep for diagnostics
  slurm-wlm          # the Slurm test cluster: slurmctld on the controller, slurmd per host
  munge              # Slurm's authentication (munged on a private socket)
  haproxy            # the load balancer in front of several instances (tests/unit/test_lb.py)
)

missing=()
for p in "${PKGS[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "setup-testbed: all packages present"
  exit 0
fi

echo "setup-testbed: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  created_policy=1
fi
cleanup() { if ((created_policy)); then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}" >/dev/null
echo "setup-testbed: done"
