"""What several test files need, made here rather than in conftest.py (pytest's advice): plain
constants, functions and classes, imported as ``from helpers import ...``. Fixtures stay in conftest.py.
Heavy modules (torch, tritonclient, the server) are imported where used, so importing this stays cheap."""

from __future__ import annotations

import copy
import http.client
import io
import json
import os
import random
import signal
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml
from PIL import Image, ImageCms

if TYPE_CHECKING:
    import torch
    import tritonclient.grpc as grpcclient

    from serve.server import TritonServer

# -- paths, and the tiny model that the serving and client tests share (made by conftest's fixtures) ---

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "reference"

TINY_CLASSES = ["stripes", "checks", "blobs", "noise"]
TINY_PREPROCESSING = {"resize": 73, "crop": 64}


def served_batch() -> int:
    """The largest batch a launcher-served model takes on this machine: the export's, or on a CPU the cap."""
    from export.triton_config import CPU_MAX_BATCH_SIZE, MAX_BATCH_SIZE
    from serve.server import gpu_present

    return MAX_BATCH_SIZE if gpu_present() else CPU_MAX_BATCH_SIZE


def read_reference(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of a released model, from the listing shipped in tests/reference."""
    rows = (REFERENCE / f"{arch}_state_dict.tsv").read_text().splitlines()[1:]
    out = []
    for row in rows:
        key, shape, _dtype = row.split("\t")
        out.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return out


# -- checkpoints ---------------------------------------------------------------------------------------


def released_checkpoint(path, arch="resnet18_3g", num_classes=1000, **model_kwargs) -> torch.nn.Module:
    """A file in the authors' format: DataParallel keys, the released dict entries."""
    import torch

    from training.model import create_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes=num_classes, **model_kwargs)
    # What DataParallel's state_dict() gives (DataParallel itself would move the model to a GPU if any).
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 115, "arch": arch.removesuffix("_3g"), "state_dict": state_dict, "best_prec1": 78.66}, path)
    return model.eval()


# -- image files: good ones, and the hostile ones uploads may carry ------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    """``img`` saved as ``fmt``; HEIF too (importing threegnet_preprocessing registers pillow-heif)."""
    import threegnet_preprocessing  # noqa: F401

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def png(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A ``w`` x ``h`` noise image, encoded (PNG unless ``fmt`` says otherwise)."""
    return encode(noise_image(w, h, seed), fmt)


def thin_png(width: int, height: int) -> bytes:
    """A few KB that decode to a thin image: 8 x 100000 is 0.8 Mpx, under the pixel cap."""
    return encode(Image.new("L", (width, height)), "PNG")


def with_exif(fmt: str, exif: bytes | Image.Exif, **kw) -> bytes:
    return encode(noise_image(56, 40), fmt, exif=exif, **kw)


def tiff_ifd(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian EXIF block (TIFF header + one IFD) written entry by entry, malformed on purpose."""
    body = struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        body += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")[:4]
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + body + struct.pack("<I", 0)


def zero_box(data: bytes, box: bytes) -> bytes:
    """An ISO-BMFF (HEIC/AVIF) file with 8 bytes after a box's type zeroed."""
    i = data.index(box) + len(box)
    return data[:i] + bytes(8) + data[i + 8 :]


def decoder_regressions() -> dict[str, bytes]:
    """Inputs that made the decoders raise something other than ImageError (found by the mutation
    corpus below, then rebuilt here from what they mean rather than kept as files)."""
    not_tiff = b"Exif\x00\x00MM_*\x00\x00\x00\x08"  # an EXIF block whose TIFF header is broken
    orientation = (0x0112, 3, 1, struct.pack("<H", 6))
    float_model = (0x0110, 11, 1, struct.pack("<f", 1.0))  # camera model, an ASCII tag, typed FLOAT
    avif = encode(noise_image(56, 40), "AVIF")
    return {
        # exif_transpose rewrites the EXIF after turning the image: AttributeError on the FLOAT tag
        "jpeg_exif_malformed_tag": with_exif("JPEG", tiff_ifd([orientation, float_model])),
        "webp_exif_not_tiff": with_exif("WEBP", not_tiff),  # SyntaxError from exif_transpose
        "png_exif_not_tiff": with_exif("PNG", not_tiff),
        "heic_exif_not_tiff": with_exif("HEIF", not_tiff),
        "avif_no_image_item": zero_box(avif, b"iloc"),  # RuntimeError from the AVIF decoder
        "avif_corrupt_planes": zero_box(avif, b"mdat"),
    }


def format_seeds() -> dict[str, bytes]:
    """One small file of each accepted format, with EXIF (orientation 6) and an ICC profile where the
    format carries them."""
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera"
    img = noise_image(56, 40)
    frames = [img, noise_image(56, 40, seed=1)]
    return {
        "jpeg": encode(img, "JPEG", exif=exif, icc_profile=icc, quality=80),
        "jpeg_progressive": encode(img, "JPEG", exif=exif, progressive=True),
        "png": encode(img, "PNG", exif=exif, icc_profile=icc),
        "gif": encode(img, "GIF", save_all=True, append_images=frames[1:]),
        "webp": encode(img, "WEBP", exif=exif, icc_profile=icc),
        "tiff": encode(img, "TIFF", exif=exif, compression="tiff_deflate"),
        "bmp": encode(img, "BMP"),
        "avif": encode(img, "AVIF", exif=exif),
        "heic": encode(img, "HEIF", exif=exif),
    }


EXTREMES = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00")


def mutations(data: bytes, seed: int, count: int) -> list[bytes]:
    """Truncations at 40 points, then ``count`` copies with 1-8 bytes flipped, replaced, or overwritten
    by an extreme 32-bit value (lengths, offsets and sizes in headers): a deterministic corpus."""
    rng = random.Random(seed)
    out = [data[: len(data) * i // 40] for i in range(1, 40)]
    for _ in range(count):
        b = bytearray(data)
        for _ in range(rng.choice((1, 2, 4, 8))):
            i, op = rng.randrange(len(b)), rng.random()
            if op < 0.5:
                b[i] = rng.randrange(256)
            elif op < 0.75:
                b[i] ^= 1 << rng.randrange(8)
            else:
                b[i : i + 4] = rng.choice(EXTREMES)
        out.append(bytes(b))
    return out


# -- raw KServe v2 HTTP requests, bytes exactly as a hostile client may send them (test_hostile_requests.py) --


def good_png(seed: int = 0, size: tuple[int, int] = (120, 90)) -> bytes:
    """A small, ordinary PNG photo-like scene (tests/photos.py)."""
    from photos import scene

    buf = io.BytesIO()
    Image.fromarray(scene(*size, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


def infer_body(blob: bytes) -> tuple[bytes, int]:
    """A KServe v2 request with the image as binary data (what tritonclient sends): body, header length."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image_bytes",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(blob)},
                }
            ]
        }
    ).encode()
    return header + len(blob).to_bytes(4, "little") + blob, len(header)


def post(
    server: TritonServer,
    body: bytes | Iterator[bytes],
    headers: dict[str, str],
    timeout: float = 120,
    model: str = "threegnet_image",
) -> tuple[int, str]:
    """One HTTP request on its own connection: (status, body text); (-1, why) if the connection broke."""
    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=timeout)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return -1, f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def infer(server: TritonServer, blob: bytes, timeout: float = 120) -> tuple[int, str]:
    body, header_length = infer_body(blob)
    headers = {"Inference-Header-Content-Length": str(header_length), "Content-Type": "application/octet-stream"}
    return post(server, body, headers, timeout)


# -- a real server under load (tests/test_operations.py, tests/test_rollouts.py) -----------------------

CROP = 64  # TINY_PREPROCESSING's crop: the side of the tensors sent to the tiny model


def server_on(repo: Path, **kwargs) -> TritonServer:
    from serve.server import TritonServer

    return TritonServer.on_free_ports(repo, exit_timeout=3, **kwargs)


def http_status(server: TritonServer, path: str, port: int | None = None) -> int:
    """The status of a GET on Triton's HTTP port, or on ``port`` of the server's host (the launcher's)."""
    address = server.http_url if port is None else f"{server.url_host}:{port}"
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, http.client.HTTPException):  # refused, reset, or cut off mid-answer
        return -1


def tensor(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, CROP, CROP, 3), dtype=np.uint8)


def infer_tensor(client: grpcclient.InferenceServerClient, model: str = "threegnet"):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("image", [1, CROP, CROP, 3], "UINT8")
    inp.set_data_from_numpy(tensor())
    return client.infer(model, [inp], client_timeout=30)


def infer_bytes(client: grpcclient.InferenceServerClient, blob: bytes):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([blob], dtype=object).reshape(1, 1))
    return client.infer("threegnet_image", [inp], client_timeout=30)


class Load(threading.Thread):
    """A steady closed-loop load: one request after another, each recorded as
    (start, end, error or None, the model version that answered)."""

    def __init__(self, server: TritonServer, send: Callable[[grpcclient.InferenceServerClient], object]) -> None:
        super().__init__(daemon=True)
        self.server, self.send = server, send
        self.results: list[tuple[float, float, str | None, str | None]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        while not self.halt.is_set():
            start = time.monotonic()
            try:
                result = self.send(client)
                self.results.append((start, time.monotonic(), None, result.get_response().model_version))
            except InferenceServerException as e:
                self.results.append((start, time.monotonic(), e.message(), None))
            time.sleep(0.01)
        client.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=60)

    def failures(self) -> list[tuple[float, float, str | None, str | None]]:
        return [r for r in self.results if r[2] is not None]


class Looping:
    """Threads that loop until the ``with`` block ends (``halt``), with a lock for what they record."""

    def __init__(self, threads: list[threading.Thread], join_timeout: float) -> None:
        self.threads, self.join_timeout = threads, join_timeout
        self.halt, self.lock = threading.Event(), threading.Lock()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(timeout=self.join_timeout)


class ClientThreads(Looping):
    """Threads of plain clients (no retries of their own) sending back to back through a fleet until the
    ``with`` block ends (tests/test_fleet.py, tests/test_canary.py). A subclass makes a client and sends
    one request; each outcome is recorded as ``outcome(protocol, start, result, error)`` returns it."""

    def __init__(self, protocols: tuple[str, ...], join_timeout: float) -> None:
        self.outcomes: list[tuple] = []
        threads = [threading.Thread(target=self._loop, args=(p, i)) for i, p in enumerate(protocols)]
        super().__init__(threads, join_timeout)

    def client(self, protocol: str):
        raise NotImplementedError

    def send(self, client, protocol: str, n: int):
        raise NotImplementedError

    def outcome(self, protocol: str, start: float, result, error: str | None) -> tuple:
        raise NotImplementedError

    def _loop(self, protocol: str, n: int) -> None:
        client = self.client(protocol)
        while not self.halt.is_set():
            n += 1
            start, result, error = time.monotonic(), None, None
            try:
                result = self.send(client, protocol, n)
            except Exception as e:  # recorded: a plain client has no retries
                error = f"{type(e).__name__}: {e}"
                client = self.client(protocol)  # as a caller would, after an error
            with self.lock:
                self.outcomes.append(self.outcome(protocol, start, result, error))
        client.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)


# -- processes: started as a shell's background job, followed through /proc (tests/test_stopping.py) ---


def _parent_pids() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def descendants(pid: int) -> set[int]:
    """The pids of every process below ``pid``: children, their children, and so on."""
    parents = _parent_pids()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"  # a zombie is dead
    except OSError:
        return False


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """As a shell script's background job starts it: own session, SIGINT ignored."""
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )  # fmt: skip


def wait_for_line(proc: subprocess.Popen, log: Path, line: str, timeout: float = 300) -> None:
    """Until ``line`` is in ``log``; fails with the log's end if ``proc`` exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


# -- TLS: certificates made on the spot (tests/test_security.py, tests/test_fleet.py) ------------------


@dataclass(frozen=True)
class Certificates:
    """A throwaway CA and what it signed: a server certificate for 127.0.0.1/localhost and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of them


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> Certificates:
    """Generate them with the openssl command line (EC P-256 keys, one day)."""
    folder.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN=threegnet test {ca}",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            cwd=folder,
        )
    for who, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (folder / f"{who}.ext").write_text(ext + "\n")
        _openssl(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            f"/CN={who}",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
            cwd=folder,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            f"{who}.ext",
            "-out",
            f"{who}.pem",
            cwd=folder,
        )
    return Certificates(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca=folder / "other-ca.pem",
    )


# -- Kubernetes manifests: the overlays as kustomize builds them (test_deploy_manifests.py, test_canary.py) --

KUBE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.37.0"


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def build(folder: Path) -> list[dict]:
    """A small kustomize: the resources (recursively), then the overlay's patches (JSON 6902 ops
    and `$patch: delete`), which is all deploy/kubernetes uses."""
    spec = kustomization(folder)
    resources: list[dict] = []
    for entry in spec.get("resources", []):
        target = (folder / entry).resolve()
        resources += build(target) if target.is_dir() else documents(target)
    for patch in spec.get("patches", []):
        body = yaml.safe_load(patch["patch"])
        if isinstance(body, dict) and body.get("$patch") == "delete":
            resources = [r for r in resources if (r["kind"], r["metadata"]["name"]) !=
                         (body["kind"], body["metadata"]["name"])]  # fmt: skip
            continue
        target = patch["target"]
        for resource in resources:
            if resource["kind"] == target["kind"] and resource["metadata"]["name"] == target["name"]:
                for op in body:
                    json_patch(resource, op)
    return resources


def json_patch(document: dict, op: dict) -> None:
    keys = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].strip("/").split("/")]
    *parents, last = [int(p) if p.isdigit() else p for p in keys]
    node = document
    for key in parents:
        node = node[key]
    if op["op"] == "remove":
        del node[last]
    elif op["op"] == "add" and last == "-":
        node.append(copy.deepcopy(op["value"]))
    elif op["op"] in ("add", "replace"):
        if op["op"] == "replace":
            node[last]
        node[last] = copy.deepcopy(op["value"])
    else:
        raise AssertionError(f"unsupported op {op}")


# -- the data plane and the control plane (tests/test_security.py, tests/test_deploy_manifests.py) -----

# Paths a load balancer or Ingress must forward (the data plane) and must not (everything else Triton answers).
DATA_PLANE_PATHS = [
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/threegnet",
    "/v2/models/threegnet/versions/2",
    "/v2/models/threegnet_image/infer",
    "/v2/models/threegnet/versions/1/infer",
    "/v2/models/threegnet/ready",
    "/v2/models/threegnet_image_classifier/versions/3/ready",
]
CONTROL_PLANE_PATHS = [
    "/v2/repository/index",
    "/v2/repository/models/threegnet/load",
    "/v2/repository/models/threegnet/unload",
    "/v2/models/threegnet/config",
    "/v2/models/threegnet/versions/1/config",
    "/v2/models/stats",
    "/v2/models/STATS",
    "/v2/models/threegnet/stats",
    "/v2/models/threegnet/versions/1/stats",
    "/v2/systemsharedmemory/status",
    "/v2/systemsharedmemory/region/r/register",
    "/v2/cudasharedmemory/status",
    "/v2/trace/setting",
    "/v2/models/threegnet/trace/setting",
    "/v2/logging",
    "/v2/models/threegnet/generate",
    "/metrics",
    "/",
    "/v2/",
    "/v2/health",
    "/v2/healthz",
    "/v2/models",
    "/v2/models/",
    "/v2/%72epository/index",
    "/v2/models/%73tats",
]
