"""evalprov_image on a fleet host: the planned image is on the host, pulled from the fleet's
registry (the Docker Hub mirror) under its Docker Hub name; nothing runs yet."""

import json
from pathlib import Path

import yaml

HOST_VARS = yaml.safe_load(
    (Path(__file__).resolve().parents[9] / "tests/molecule/host_vars.yml").read_text()
)
MANIFEST_TYPES = ",".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)


def test_planned_image_is_on_the_host_with_the_registrys_digest(host):
    name = HOST_VARS["evalprov_image_name"]
    repo, tag = name.rsplit(":", 1)
    inspect = host.run(f"docker image inspect {name}")
    assert inspect.rc == 0, inspect.stderr
    info = json.loads(inspect.stdout)[0]
    assert name in info["RepoTags"]
    assert info["Config"]["Labels"]["org.opencontainers.image.title"] == "evalprov-standin"
    # the digest the host pulled is the one the mirror serves for that tag
    mirrors = host.check_output("docker info --format '{{json .RegistryConfig.Mirrors}}'")
    mirror = json.loads(mirrors)
    assert len(mirror) == 1
    head = host.check_output(
        f"curl -sfI -H 'Accept: {MANIFEST_TYPES}' {mirror[0].rstrip('/')}/v2/{repo}/manifests/{tag}"
    )
    digest = next(
        line.split(":", 1)[1].strip()
        for line in head.splitlines()
        if line.lower().startswith("docker-content-digest:")
    )
    assert info["RepoDigests"] == [f"{repo}@{digest}"]


def test_pulling_the_image_started_nothing(host):
    assert host.run("docker ps -aq").stdout.split() == []
