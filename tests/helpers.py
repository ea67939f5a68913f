"""What several test files need, made here rather than in conftest.py (pytest's advice)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


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
