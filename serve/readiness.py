"""Readiness that means "this server answers": every model it serves has a version READY in Triton.

Triton's strict readiness (``/v2/health/ready`` on its own port) is false while any version of any model
is not READY, a new version LOADING beside the serving one included: during every rollout a replica says
"not ready" for the seconds the load takes, and replicas that share a repository load together, so a load
balancer's pool empties although every replica answers (docs/operations.md, "Readiness"). The launcher
answers readiness on its own port from Triton's repository index instead: ready while Triton answers and
every model of the repository has a READY version; not while a model is unloaded (a heal), while Triton
does not answer within ``timeout`` (hung), or once the launcher is gone (the port is closed).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

from serve.endpoints import LIVE_PATH, READY_PATH

TIMEOUT_S = 0.4  # per call to Triton: both within a 1 s probe (HAProxy's check, the readinessProbe)


def _get(url: str, timeout: float, data: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def readiness(
    http_url: str,
    models: Callable[[], list[str]],
    headers: dict[str, str] | None,
    timeout: float = TIMEOUT_S,
    rolling_out: Callable[[], bool] = lambda: False,
) -> tuple[bool, str]:
    """(ready, why) for the Triton at ``http_url`` (host:port) serving ``models()``; with no models to
    follow (a remote repository), Triton's own strict readiness. ``headers``: the operators' key, which
    the repository index needs. While ``rolling_out()``, the serving version answers on, so only a Triton
    that is not live makes it not ready (a rollout's load can make the index slow or a model briefly not
    READY; a heal's unload is not a rollout)."""
    base = f"http://{http_url}"
    try:
        served = models()
        if not served:
            _get(base + READY_PATH, timeout)
            return True, "ready"
        _get(base + LIVE_PATH, timeout)
    except (OSError, ValueError) as e:  # HTTPError (not ready, refused) is an OSError too
        return False, f"Triton does not answer: {e}"
    try:
        index = json.loads(_get(base + "/v2/repository/index", timeout, b"{}", headers))
    except (OSError, ValueError) as e:
        return (True, "ready (rolling out)") if rolling_out() else (False, f"Triton does not answer: {e}")
    ready = {m.get("name") for m in index if m.get("state") == "READY"}
    missing = [name for name in served if name not in ready]
    if missing and not rolling_out():
        return False, f"no version READY: {', '.join(sorted(missing))}"
    return True, "ready"
