"""Least privilege: checkov finds no failed check in the manifests and the images, the images and
the pods run as the same unprivileged user, and the launcher really serves as that user (UID
10001, no capabilities, no new privileges), on a read-only copy of the repository, and also with
the root filesystem read-only and only the Deployment's emptyDir paths writable: the proof that
the manifest's list of writable paths is complete."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY_CLASSES

from serve.children import NotAnswering, wait_http_ok
from serve.endpoints import CONTROL_KEY_FILE_ENV, CONTROL_KEY_HEADER, READY_PATH

KUBE = ROOT / "deploy" / "kubernetes"
CHECKOV_VENV = ROOT / "build" / "checkov"  # where `make checkov` installs it
DOCKERFILES = [ROOT / "serve" / "Dockerfile", ROOT / "training" / "Dockerfile"]


def checkov_version_pin() -> str:
    return re.search(r"^CHECKOV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)


def run_checkov(framework: str, *target: str) -> dict:
    checkov = CHECKOV_VENV / "bin" / "checkov"
    if not checkov.exists():
        pytest.fail(f"{checkov} is missing: run `make checkov` (it installs checkov into {CHECKOV_VENV})")
    result = subprocess.run(
        [str(checkov), "-o", "json", "--compact", "--quiet", "--skip-download", "--framework", framework, *target],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.stdout.strip(), f"checkov printed nothing (exit {result.returncode}):\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    assert isinstance(report, dict), f"checkov found nothing to scan in {target}: {report}"
    return report


@pytest.mark.parametrize(
    ("framework", "target"),
    [("kubernetes", ("-d", "deploy")), *[("dockerfile", ("-f", str(p.relative_to(ROOT)))) for p in DOCKERFILES]],
    ids=["deploy", "serve-Dockerfile", "training-Dockerfile"],
)
def test_checkov_finds_no_failed_check(framework, target):
    report = run_checkov(framework, *target)
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']}:{c['file_line_range']})"
        for c in report["results"].get("failed_checks", [])
    ]
    assert summary["failed"] == 0 and not failed, "\n".join(failed)
    assert summary["passed"] > 0 and summary["resource_count"] > 0
    assert summary["parsing_errors"] == 0  # a file checkov cannot parse would go unscanned
    assert summary["checkov_version"] == checkov_version_pin()


def test_checks_are_skipped_only_inline_and_with_a_reason():
    assert not [p for p in ROOT.glob(".checkov*")], "no global skip list: skip a check where it does not apply"
    manifests = [p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml"]
    skips = []
    for path in manifests:
        for doc in yaml.safe_load_all(path.read_text()):
            for key, value in ((doc or {}).get("metadata", {}).get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    skips.append(value)
                    check, _, reason = value.partition("=")
                    assert re.fullmatch(r"CKV2?_K8S_\d+", check) and len(reason.split()) >= 4, f"{path}: {value}"
    for path in DOCKERFILES:
        for line in re.findall(r"^#\s*checkov:skip=(.*)$", path.read_text(), re.M):
            skips.append(line)
            check, _, reason = line.partition(":")
            assert re.fullmatch(r"CKV2?_DOCKER_\d+", check) and len(reason.split()) >= 4, f"{path}: {line}"
    assert skips  # the parsing above found the skips that exist (image digests, the training healthcheck)


# -- the pods and the images agree on one unprivileged user and on what is writable ---------------


def pod_specs() -> dict[str, dict]:
    docs = {p: list(yaml.safe_load_all(p.read_text())) for p in (KUBE / "base" / "deployment.yaml",
                                                                  KUBE / "training" / "job.yaml")}  # fmt: skip
    return {doc["kind"]: doc["spec"]["template"]["spec"] for d in docs.values() for doc in d}


def image_user(dockerfile: Path) -> tuple[int, int]:
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile.read_text(), re.M)
    assert users, f"{dockerfile}: no numeric USER uid:gid (Kubernetes can only verify runAsNonRoot on a number)"
    return int(users[-1][0]), int(users[-1][1])


def writable_paths(pod: dict) -> list[str]:
    """The container's writable mounts backed by emptyDirs: all it may write besides its volumes."""
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    return sorted(m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in empty)


@pytest.mark.parametrize(("kind", "dockerfile"), [("Deployment", DOCKERFILES[0]), ("Job", DOCKERFILES[1])])
def test_pods_run_as_the_images_unprivileged_user_with_nothing_to_escalate(kind, dockerfile):
    pod = pod_specs()[kind]
    security = pod["securityContext"]
    uid, gid = image_user(dockerfile)
    assert uid >= 10000 and (security["runAsUser"], security["runAsGroup"]) == (uid, gid)
    assert security["runAsNonRoot"] is True and security["fsGroup"] == gid
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    c = container["securityContext"]
    assert c["allowPrivilegeEscalation"] is False and c["readOnlyRootFilesystem"] is True
    assert c["capabilities"] == {"drop": ["ALL"]} and not c.get("privileged")
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()
    assert "/tmp" in writable_paths(pod) and "/dev/shm" in writable_paths(pod)
    text = dockerfile.read_text()
    assert "HEALTHCHECK" in text or "checkov:skip=CKV_DOCKER_2" in text


# -- the launcher, really serving as that user ------------------------------------------------------


def first_blocked_ancestor(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that a user owning none of them cannot enter."""
    for parent in reversed(path.resolve().parents):
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


# Runs as root in a private mount namespace, then becomes UID/GID 10001 with no capabilities.
#   $EXPOSE_BASE / $EXPOSE_OVER: the Python installation, and the closed directory above it (pyenv
#     under /root) that is covered, in this namespace only, by a tmpfs holding just that installation;
#   $READ_ONLY_ROOT=1: the root filesystem read-only, a fresh tmpfs on each of $WRITABLE (the
#     Deployment's emptyDirs); $INPUTS (the repository, the key), if one of those hid them, are
#     bound again read-only at their paths, as Kubernetes mounts the volume and the Secret.
SANDBOX = r"""
set -eu
umask 022
if [ -n "$EXPOSE_OVER" ]; then
    t=$(mktemp -d -p "$WORK" stage.XXXX)
    mount -t tmpfs -o mode=755 tmpfs "$t"
    mkdir -p "$t/${EXPOSE_BASE#"$EXPOSE_OVER"/}"
    mount --bind -o ro "$EXPOSE_BASE" "$t/${EXPOSE_BASE#"$EXPOSE_OVER"/}"
    mount --move "$t" "$EXPOSE_OVER"
fi
if [ "$READ_ONLY_ROOT" = 1 ]; then
    last=""
    for w in $WRITABLE; do
        t=$(mktemp -d -p "$WORK" writable.XXXX)
        mount -t tmpfs -o mode=1777,size=1g tmpfs "$t"
        for input in $INPUTS; do
            case "$input" in "$w"/*)
                mkdir -p "$t/${input#"$w"/}"
                mount --bind -o ro "$input" "$t/${input#"$w"/}" ;;
            esac
        done
        case "$WORK" in
            "$w"/*) last="$t:$w" ;;  # it hides the staging folder: cover it last
            *) mount --move "$t" "$w" ;;
        esac
    done
    [ -z "$last" ] || mount --move "${last%%:*}" "${last#*:}"
    mount -o remount,bind,ro /
fi
exec setpriv --reuid 10001 --regid 10001 --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all "$@"
"""


def http(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        return e.code, {}


@pytest.fixture
def sandbox_dir(model_repository: Path):
    """A folder under /tmp that UID 10001 can enter, holding a root-owned, read-only copy of the
    exported repository and the operators' key as Kubernetes mounts it (root:fsGroup, 0440)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it switches to an unprivileged user and builds a mount namespace")
    for tool in ("unshare", "setpriv", "mount"):
        assert shutil.which(tool), f"{tool} (util-linux) is needed"
    blocked = {p: first_blocked_ancestor(p) for p in (ROOT / "serve" / "launch.py", Path(sys.prefix) / "bin")}
    closed = {str(p): str(b) for p, b in blocked.items() if b is not None}
    assert not closed, (
        f"an unprivileged user cannot reach the checkout or its virtualenv ({closed}): "
        "clone it where every parent directory is world-executable (chmod o+x), e.g. under /work or /home"
    )
    work = Path(tempfile.mkdtemp(prefix="least-privilege-", dir="/tmp"))
    work.chmod(0o755)
    repo = work / "repo"
    shutil.copytree(model_repository, repo)
    secrets = work / "secrets"
    secrets.mkdir()
    (secrets / "control-key").write_text("operators-key-for-the-least-privilege-test\n")
    os.chown(secrets / "control-key", 0, 10001)
    (secrets / "control-key").chmod(0o440)
    for path in [repo, *repo.rglob("*")]:
        os.chown(path, 0, 0, follow_symlinks=False)
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield work
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("read_only_root", [False, True], ids=["unprivileged", "read-only-root"])
def test_the_launcher_serves_as_an_unprivileged_user(sandbox_dir, read_only_root):
    from serve.server import free_port

    work, repo = sandbox_dir, sandbox_dir / "repo"
    base = Path(sys.base_prefix).resolve()
    over = first_blocked_ancestor(base / "bin")  # pyenv's Python under /root (0700), for instance
    writable = writable_paths(pod_specs()["Deployment"])
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        # the checkout and its virtualenv too: a clone under /tmp (as CI may make) would vanish under the emptyDir
        "WORK": str(work), "INPUTS": f"{repo} {work / 'secrets'} {ROOT} {Path(sys.prefix).resolve()}",
        "WRITABLE": " ".join(writable),
        "READ_ONLY_ROOT": "1" if read_only_root else "0",
        "EXPOSE_BASE": str(base) if over else "", "EXPOSE_OVER": str(over) if over else "",
        # what the image and the Deployment set, nothing inherited from this root shell
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",  # the image's: haproxy is in sbin
        "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        CONTROL_KEY_FILE_ENV: str(work / "secrets" / "control-key"),
    }  # fmt: skip
    command = [str(Path(sys.prefix) / "bin" / "python"), str(ROOT / "serve" / "launch.py"),
               "--model-repository", str(repo), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
               "--metrics-port", str(metrics_port), "--supervisor-metrics-port", str(free_port()),
               "--exit-timeout", "3"]  # fmt: skip
    log = work / "launcher.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", SANDBOX, "sandbox", *command],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/",
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        try:
            wait_http_ok(base_url + READY_PATH, process, 240)
        except NotAnswering as e:
            pytest.fail(f"the launcher: {e}\n{log.read_text()[-5000:]}")
        # It really is the unprivileged user, with no capability and no way to gain one.
        status = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines())
        assert status["Uid"].split() == ["10001"] * 4 and status["Gid"].split() == ["10001"] * 4
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
        # One real inference over HTTP (KServe v2 JSON).
        code, meta = http(f"{base_url}/v2/models/threegnet_classifier")
        assert code == 200, meta
        shape = [1, *meta["inputs"][0]["shape"][1:]]
        pixels = [(i * 37) % 256 for i in range(shape[1] * shape[2] * shape[3])]
        body = {"inputs": [{"name": meta["inputs"][0]["name"], "datatype": "UINT8", "shape": shape, "data": pixels}]}
        code, result = http(f"{base_url}/v2/models/threegnet_classifier/infer", body, timeout=60)
        assert code == 200, result
        probabilities = next(o for o in result["outputs"] if o["name"] == "probabilities")
        assert probabilities["shape"] == [1, len(TINY_CLASSES)]
        assert abs(sum(probabilities["data"]) - 1) < 1e-4
        # The key file as Kubernetes mounts it (root:fsGroup 0440) is read: the control plane opens with it only.
        assert http(f"{base_url}/v2/models/stats")[0] in (401, 403)
        key = (work / "secrets" / "control-key").read_text().strip()
        assert http(f"{base_url}/v2/models/stats", headers={CONTROL_KEY_HEADER: key})[0] == 200
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            returncode = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert returncode == 0, f"the launcher did not stop cleanly ({returncode}):\n{log.read_text()[-5000:]}"
