"""What a served replica exposes, written once: the launcher's defaults, the container image,
the Kubernetes manifests (checked by tests/test_deploy_manifests.py) and the local fleet
rehearsal (deploy/local_fleet.py) all read these."""

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
LIVE_PATH = "/v2/health/live"  # 200 while the process runs
READY_PATH = "/v2/health/ready"  # 200 only while every loaded model can answer (see README "Operating it")
METRICS_PATH = "/metrics"
IMAGE = "threegnet-triton"  # what `docker build -t ... -f serve/Dockerfile .` is tagged
CONTAINER_REPOSITORY = "/models"  # where the container reads the model repository
EXIT_TIMEOUT_S = 30  # how long a stopping server drains in-flight requests


class Addresses:
    """``http_url`` and ``grpc_url`` (``host:port``, as tritonclient takes them) of anything that
    serves both protocols on ``host``: a Triton server, or the fleet's load balancer."""

    host: str
    http_port: int
    grpc_port: int

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"
