"""Talking to Triton about 3G-Net models: the one client the predict CLI and the demo share.

``tritonclient`` speaks the protocol; this module adds what both front ends need on
top of it, the same way for HTTP and gRPC: finding the image-bytes ensemble and the
raw-tensor model from each other's config ``parameters`` (``image_model`` /
``tensor_model``), reading the preprocessing record for local preprocessing, top-k
answers through Triton's classification extension, the optional ``weight_map``
output, retries with backoff and jitter on what passes (a connection error, a
server refusing work because its queue is full, a model being reloaded), timeouts,
and four errors a user can act on: :class:`ServerUnreachable`,
:class:`ModelUnavailable`, :class:`ServerOverloaded` and :class:`RequestFailed`.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from threegnet_preprocessing import Preprocessing

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
DEFAULT_MODEL = "threegnet"
WEIGHT_MAP = "weight_map"

T = TypeVar("T")


class ClientError(RuntimeError):
    """A failure the user can act on; the message says what and where."""


class ServerUnreachable(ClientError):
    """No Triton server answers at the URL (after the retries)."""


class ModelUnavailable(ClientError):
    """The server answers but the model asked for is missing or not ready."""


class RequestFailed(ClientError):
    """The server refused or failed one request (a bad image, a timeout); others may succeed."""


class ServerOverloaded(RequestFailed):
    """The server shed the request (its queue was full, or the request waited past the queue
    timeout: gRPC UNAVAILABLE, HTTP 503), also after the retries. Later requests may pass."""


# What Triton's admission control says (config.pbtxt default_queue_policy): queue full, queue timeout.
OVERLOAD_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")


def default_url(protocol: str) -> str:
    return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"


@dataclass(frozen=True)
class Prediction:
    """One of the top-k classes."""

    index: int
    label: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "probability": self.probability}


@dataclass(frozen=True)
class Classification:
    """The answer for one image: top-k in descending probability, and the weight map if asked for."""

    top_k: list[Prediction]
    weight_map: np.ndarray | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about a 3G-Net model and its image-bytes ensemble."""

    name: str  # the raw-tensor model
    version: str  # its newest ready version
    image_model: str | None  # the bytes ensemble, None when it is not ready
    arch: str
    precision: str
    num_classes: int
    preprocessing: Preprocessing | None
    max_batch_size: int
    tensor_input: str
    bytes_input: str | None
    classes_output: str  # the output that carries a labels file
    has_weight_map: bool

    def summary(self) -> str:
        return f"{self.name} v{self.version} ({self.arch}, {self.precision}, {self.num_classes} classes)"


@dataclass(frozen=True)
class ServerHealth:
    url: str
    protocol: str
    live: bool
    ready: bool
    version: str = ""
    error: str = ""


def parse_classes(entries: Sequence[bytes | str]) -> list[Prediction]:
    """Triton classification strings ``"probability:index:label"`` into predictions,
    highest probability first. Labels may themselves contain colons."""
    out = []
    for entry in entries:
        text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
        probability, index, label = text.split(":", 2)
        out.append(Prediction(index=int(index), label=label, probability=float(probability)))
    return sorted(out, key=lambda p: (-p.probability, p.index))


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _is_overloaded(e: BaseException) -> bool:
    return isinstance(e, InferenceServerException) and any(m in (e.message() or "") for m in OVERLOAD_MESSAGES)


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, InferenceServerException):
        return e.status() == "StatusCode.UNAVAILABLE" and not _is_overloaded(e)
    return isinstance(e, OSError) and not isinstance(e, TimeoutError)


def _is_model_missing(e: BaseException) -> bool:
    """Triton's "unknown model" (also while a model unloads): not the request's fault."""
    return isinstance(e, InferenceServerException) and e.status() in ("StatusCode.NOT_FOUND", "404")


def _is_timeout(e: BaseException) -> bool:
    if isinstance(e, InferenceServerException):
        return e.status() == "StatusCode.DEADLINE_EXCEEDED"
    return isinstance(e, TimeoutError)


def _message(e: BaseException) -> str:
    if isinstance(e, InferenceServerException):
        return e.message() or str(e)
    return (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__


class TritonClassifier:
    """Classify images with a 3G-Net model served by Triton, over gRPC or HTTP.

    Thread-safe: each thread gets its own ``tritonclient`` client (the HTTP one is
    not thread-safe), so callers may run several requests at once from a pool.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model: str = DEFAULT_MODEL,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0; got {timeout}, {retries}, {backoff}")
        self.protocol = protocol
        self.url = url or default_url(protocol)
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._local = threading.local()
        self._info: ModelInfo | None = None
        self._info_lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"{self.url} ({'gRPC' if self.protocol == 'grpc' else 'HTTP'})"

    # -- transport -------------------------------------------------------------------------
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = grpcclient.InferenceServerClient(self.url)
            else:
                client = httpclient.InferenceServerClient(
                    self.url, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            self._local.client = client
        return client

    def _call(self, what: str, fn: Callable[..., T]) -> T:
        """``fn(client, **timeout)`` on this thread's client. What passes is retried with
        exponential backoff and jitter: connection errors (then :class:`ServerUnreachable`),
        overload refusals (then :class:`ServerOverloaded`) and a model missing while the
        server reloads it (then :class:`ModelUnavailable`). Other failures raise
        :class:`RequestFailed` with the server's message at once."""
        timeout = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}  # HTTP: set on the client
        attempt = 0
        while True:
            try:
                return fn(self._client(), **timeout)
            except (InferenceServerException, OSError) as e:
                if _is_timeout(e):
                    raise RequestFailed(f"{what}: no answer from {self.where} within {self.timeout:g} s") from None
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                if _is_overloaded(e):
                    if attempt == self.retries:
                        raise ServerOverloaded(
                            f"{what}: the server at {self.where} is overloaded and refused the request "
                            f"({_message(e)}; {tries}); try again later or send less at once"
                        ) from None
                elif _is_model_missing(e):
                    if attempt == self.retries:
                        raise ModelUnavailable(f"{what} at {self.where}: {_message(e)}") from None
                elif not _is_connection_error(e):
                    raise RequestFailed(_message(e)) from None
                elif attempt == self.retries:
                    raise ServerUnreachable(
                        f"cannot reach Triton at {self.where}: {_message(e)} ({tries}; "
                        "is the server running? python serve/launch.py --model-repository DIR)"
                    ) from None
                else:
                    self._local.client = None  # a fresh connection for the retry
            time.sleep(self.retry_delay(attempt))
            attempt += 1

    def retry_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: half fixed, half random, so that clients refused
        together do not come back together."""
        delay = self.backoff * 2**attempt
        return delay / 2 + random.uniform(0, delay / 2)

    # -- discovery -------------------------------------------------------------------------
    def health(self) -> ServerHealth:
        """Server liveness, readiness and version; never raises."""
        try:
            live = self._call("live", lambda c, **kw: c.is_server_live(**kw))
            ready = self._call("ready", lambda c, **kw: c.is_server_ready(**kw))
            meta = self._call("metadata", lambda c, **kw: c.get_server_metadata(**self._json(), **kw))
        except ClientError as e:
            return ServerHealth(self.url, self.protocol, live=False, ready=False, error=str(e))
        return ServerHealth(self.url, self.protocol, live=live, ready=ready, version=meta.get("version", ""))

    def _json(self) -> dict[str, bool]:
        return {"as_json": True} if self.protocol == "grpc" else {}

    def _index(self) -> list[dict[str, Any]]:
        index = self._call("repository index", lambda c, **kw: c.get_model_repository_index(**self._json(), **kw))
        return index.get("models", []) if isinstance(index, dict) else index

    def ready_models(self) -> dict[str, str]:
        """Ready model name -> its newest ready version."""
        versions: dict[str, list[str]] = {}
        for entry in self._index():
            if entry.get("state") == "READY":
                versions.setdefault(entry["name"], []).append(str(entry.get("version", "")))
        return {name: max(v, key=lambda x: int(x) if x.isdigit() else -1) for name, v in versions.items()}

    def _config(self, name: str) -> dict[str, Any]:
        config = self._call(f"config of {name}", lambda c, **kw: c.get_model_config(name, **self._json(), **kw))
        return config.get("config", config)

    def describe(self, refresh: bool = False) -> ModelInfo:
        """Find the model and its partner (cached; ``refresh`` asks again).

        ``model`` may name either the raw-tensor model or the bytes ensemble: each
        names the other in its config parameters.
        """
        with self._info_lock:
            if self._info is None or refresh:
                self._info = self._describe()
            return self._info

    def _describe(self) -> ModelInfo:
        ready = self.ready_models()
        if self.model not in ready:
            entries = {e["name"]: e for e in self._index()}
            if self.model in entries:
                entry = entries[self.model]
                reason = f" ({entry['reason']})" if entry.get("reason") else ""
                problem = f"is {entry.get('state') or 'not ready'}{reason}"
            else:
                problem = "is not on the server"
            listing = ", ".join(sorted(ready)) or "none"
            raise ModelUnavailable(f"model '{self.model}' {problem} at {self.where}; ready models: {listing}")
        config = self._config(self.model)
        params = _parameters(config)
        # Every ensemble (the bytes model, the classifiers) names its tensor model; the tensor model
        # names the full bytes ensemble.
        tensor_name = params.get("tensor_model", self.model)
        if tensor_name != self.model:
            if tensor_name not in ready:
                raise ModelUnavailable(
                    f"model '{tensor_name}' (the tensor model behind '{self.model}') is not ready at {self.where}; "
                    f"ready models: {', '.join(sorted(ready))}"
                )
            config = self._config(tensor_name)
            params = _parameters(config)
        image_name = params.get("image_model")
        image_name = image_name if image_name in ready else None
        bytes_input = self._config(image_name)["input"][0]["name"] if image_name else None
        outputs = {o["name"]: o for o in config["output"]}
        classes = next((n for n, o in outputs.items() if o.get("label_filename")), next(iter(outputs)))
        pp = params.get("preprocessing")
        return ModelInfo(
            name=tensor_name,
            version=ready[tensor_name],
            image_model=image_name,
            arch=params.get("arch", "unknown arch"),
            precision=params.get("precision", "fp32"),
            num_classes=int(params.get("num_classes") or outputs[classes]["dims"][-1]),
            preprocessing=Preprocessing.from_dict(json.loads(pp)) if pp else None,
            max_batch_size=int(config.get("max_batch_size", 0)),
            tensor_input=config["input"][0]["name"],
            bytes_input=bytes_input,
            classes_output=classes,
            has_weight_map=WEIGHT_MAP in outputs,
        )

    # -- inference -------------------------------------------------------------------------
    def _module(self) -> Any:
        return grpcclient if self.protocol == "grpc" else httpclient

    def _infer(
        self, model: str, input_name: str, data: np.ndarray, datatype: str, top_k: int, weight_map: bool
    ) -> list[Classification]:
        info = self.describe()
        mod = self._module()
        inp = mod.InferInput(input_name, list(data.shape), datatype)
        inp.set_data_from_numpy(data)
        k = max(1, min(top_k, info.num_classes))
        outputs = [mod.InferRequestedOutput(info.classes_output, class_count=k)]
        want_map = weight_map and info.has_weight_map
        if want_map:
            outputs.append(mod.InferRequestedOutput(WEIGHT_MAP))
        try:
            result = self._call(f"inference on {model}", lambda c, **kw: c.infer(model, [inp], outputs=outputs, **kw))
        except (ServerUnreachable, ModelUnavailable):
            self._info = None  # the server or the model may come back changed: describe it again next time
            raise
        classes = result.as_numpy(info.classes_output).reshape(len(data), -1)
        maps = result.as_numpy(WEIGHT_MAP) if want_map else None
        return [Classification(parse_classes(row), None if maps is None else maps[i]) for i, row in enumerate(classes)]

    def classify_bytes(self, images: Sequence[bytes], top_k: int = 5, weight_map: bool = False) -> list[Classification]:
        """Encoded images (JPEG, PNG, ...) through the bytes ensemble: the server decodes and
        preprocesses. One bad image fails the whole request with the server's message."""
        info = self.describe()
        if info.image_model is None or info.bytes_input is None:
            raise ModelUnavailable(
                f"model '{info.name}' has no image-bytes ensemble ready at {self.where} "
                "(send preprocessed tensors instead: --send tensor)"
            )
        data = np.empty((len(images), 1), dtype=object)
        data[:, 0] = list(images)
        return self._infer(info.image_model, info.bytes_input, data, "BYTES", top_k, weight_map)

    def classify_tensors(self, batch: np.ndarray, top_k: int = 5, weight_map: bool = False) -> list[Classification]:
        """Preprocessed uint8 NHWC crops (``threegnet_preprocessing.preprocess``) to the raw model."""
        info = self.describe()
        return self._infer(info.name, info.tensor_input, np.ascontiguousarray(batch), "UINT8", top_k, weight_map)
