"""What the supervisor did, for Prometheus: heals, rollouts and refused versions, per model; and the
queue length at which each model refuses, which Triton's metrics do not carry.

Triton's own ``/metrics`` (port 8002) cannot carry them: the supervisor runs beside Triton, in
the launcher. So the launcher serves them on a port of its own (``SUPERVISOR_METRICS_PORT``, on
Triton's address), in Prometheus' text format; the rehearsal's Prometheus and the cluster's
ServiceMonitor scrape both ports (docs/monitoring.md).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from serve.endpoints import METRICS_PATH, READY_PATH

if TYPE_CHECKING:
    from serve.supervisor import Supervisor

FAMILIES = (
    ("threegnet_supervisor_heals_total", "Models reloaded after one of their backend processes died."),
    ("threegnet_supervisor_rollouts_total", "Changed models loaded from the repository (new versions, pins)."),
    ("threegnet_supervisor_rejected_versions_total", "Versions refused: incomplete or failing their checks."),
)

QUEUE_SIZE = "threegnet_model_max_queue_size"
QUEUE_SIZE_HELP = (
    "The queue length at which Triton refuses the model's requests (max_queue_size of the config it serves; "
    "no sample: unbounded). Triton 2.51 counts a full queue's refusals nowhere: the overload alert compares "
    "nv_inference_pending_request_count with this."
)


def exposition(supervisor: Supervisor) -> str:
    """The counters and the queue sizes in Prometheus' text format. Each counter has a sample per model,
    zeros included: a series that exists from the start makes ``increase()`` and the alerts work from the
    first event."""
    counts = (
        Counter(model for model, _, _ in supervisor.outages),
        supervisor.rolled_out,
        Counter(model for model, _, _ in supervisor.rejections),
    )
    models = sorted(set(supervisor.models()).union(*counts))
    lines = []
    for (name, help_text), per_model in zip(FAMILIES, counts, strict=True):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines += [f'{name}{{model="{model}"}} {per_model[model]}' for model in models]
    lines += [f"# HELP {QUEUE_SIZE} {QUEUE_SIZE_HELP}", f"# TYPE {QUEUE_SIZE} gauge"]
    lines += [f'{QUEUE_SIZE}{{model="{model}"}} {size}' for model, size in sorted(supervisor.queue_sizes().items())]
    return "\n".join(lines) + "\n"


class MetricsServer(ThreadingHTTPServer):
    """``GET /metrics`` on ``host:port`` in a daemon thread, until :meth:`close`; and ``GET
    /v2/health/ready`` with ``ready()``'s answer (serve/readiness.py), when given."""

    daemon_threads = True

    def __init__(
        self, supervisor: Supervisor, host: str, port: int, ready: Callable[[], tuple[bool, str]] | None = None
    ) -> None:
        self.supervisor, self.ready = supervisor, ready
        super().__init__((host, port), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, name="supervisor-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == READY_PATH and self.server.ready is not None:
            ready, why = self.server.ready()
            self._answer(200 if ready else 503, why + "\n", "text/plain; charset=utf-8")
        elif path == METRICS_PATH:
            self._answer(200, exposition(self.server.supervisor), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self.send_error(404)

    def _answer(self, status: int, text: str, content_type: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes are not worth a log line
        pass
