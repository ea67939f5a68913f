"""Triton's repository API (load, unload, index, configs) with the operators' key.

The launcher locks those endpoints behind the key (serve/control.py), so every call carries it. The
HTTP client is not thread-safe: one instance is made lazily, on first use, by the thread that then
makes every call (the supervisor's).
"""

from __future__ import annotations

from typing import Any

import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


class TritonAPI:
    """One Triton server's repository API, called with the operators' key ``headers``."""

    def __init__(self, http_url: str, headers: dict[str, str] | None) -> None:
        self.http_url = http_url
        self.headers = headers  # the operators' key: the repository API is locked without it
        self._client: httpclient.InferenceServerClient | None = None

    @property
    def client(self) -> httpclient.InferenceServerClient:
        if self._client is None:  # made in the supervising thread: the HTTP client is not thread-safe
            self._client = httpclient.InferenceServerClient(self.http_url, network_timeout=600)
        return self._client

    def load(self, name: str, config: str | None = None) -> str | None:
        """Load (or reload) ``name``, with ``config`` (JSON) overriding its config.pbtxt when given;
        None when it worked, else Triton's error."""
        try:
            self.client.load_model(name, headers=self.headers, config=config)
        except InferenceServerException as e:
            return e.message() or str(e)
        return None

    def unload(self, name: str) -> str | None:
        try:
            self.client.unload_model(name, headers=self.headers)
        except InferenceServerException as e:
            return e.message() or str(e)
        return None

    def index(self) -> list[dict[str, Any]]:
        """Every model version Triton knows: name, version, state (and reason); empty when it cannot say."""
        try:
            return self.client.get_model_repository_index(headers=self.headers)
        except InferenceServerException:
            return []

    def ready_versions(self, name: str) -> list[str]:
        """The versions of ``name`` Triton's index calls READY."""
        return [str(m.get("version")) for m in self.index() if m.get("name") == name and m.get("state") == "READY"]
