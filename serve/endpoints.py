"""What a served replica exposes, written once: the launcher's defaults, the container image,
the Kubernetes manifests (checked by tests/test_deploy_manifests.py) and the local fleet
rehearsal (deploy/local_fleet.py) all read these."""

HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
SUPERVISOR_METRICS_PORT = 8003  # the launcher's own: its readiness (serve/readiness.py) and metrics (serve/metrics.py)
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
    def url_host(self) -> str:
        """The host as a URL spells it: an IPv6 address in brackets."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def http_url(self) -> str:
        return f"{self.url_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.url_host}:{self.grpc_port}"


# The operators' key: Triton's control plane (loading, unloading, configs, shared memory, statistics,
# trace, logging) answers only requests that carry it (docs/security.md). The launcher reads it from
# the file CONTROL_KEY_FILE_ENV names, else from CONTROL_KEY_ENV, else makes a random one per run.
CONTROL_KEY_ENV = "THREEGNET_CONTROL_KEY"
CONTROL_KEY_FILE_ENV = "THREEGNET_CONTROL_KEY_FILE"
CONTROL_KEY_HEADER = "control-key"  # HTTP header; over gRPC the metadata triton-grpc-protocol-control-key
CONTROL_KEY_SECRET = "threegnet-control-key"  # the Kubernetes Secret holding it, under the key CONTROL_KEY_SECRET_KEY
CONTROL_KEY_SECRET_KEY = "control-key"
CONTROL_KEY_MOUNT = "/var/run/secrets/threegnet"  # where pods mount that Secret (the file: MOUNT/SECRET_KEY)
# Only these paths are data plane: what a load balancer or Ingress forwards to a replica.
DATA_PLANE_HTTP_PATHS = ("/v2/health/", "/v2/models/")  # plus GET /v2 (server metadata)
DATA_PLANE_GRPC_METHODS = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer",
)  # fmt: skip
# The export names a model's partners after it: NAME_image (image bytes in), NAME_classifier (tensors in,
# probabilities only) and NAME_image_classifier; clients find them by these names.
IMAGE_MODEL_SUFFIX = "_image"
CLASSIFIER_SUFFIX = "_classifier"
# The largest request body the launcher's front (serve/front.py), a load balancer or the Ingress forwards: a
# batch of 8 uploads (predict.py's default) at the preprocessing's 25 MiB cap per image, plus framing. Triton
# 2.51 caps nothing itself: a 2 GiB body aborts it (docs/security.md#the-caps-in-front-of-triton).
MAX_REQUEST_MB = 256
# When a replica hangs (docs/deploy.md "When a pod hangs"; the measurements in
# docs/performance.md#9-hung-replicas-and-the-soak-2026-11-29). The load balancer in front (HAProxy in
# deploy/local_fleet.py, ingress-nginx in the cluster) and the liveness probe read
# these; tests/test_deploy_manifests.py checks that the manifests agree.
UPSTREAM_TIMEOUT_S = 3  # a replica silent this long is given up on: 1.5x the slowest healthy p99.9 (1.9 s)
UPSTREAM_ATTEMPTS = 3  # tries per request, each on another replica: the first and two retries
UPSTREAM_BUDGET_S = UPSTREAM_TIMEOUT_S * UPSTREAM_ATTEMPTS  # all of them together, then an error, never a queue
LIVENESS_PERIOD_S = 10  # how often the kubelet asks /v2/health/live
LIVENESS_TIMEOUT_S = 5  # an answer later than this is a failure: several times the slowest at 2x overload
LIVENESS_FAILURES = 3  # failures in a row before the container is restarted
