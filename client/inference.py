"""Talking to Triton about 3G-Net models: the one client the predict CLI and the demo share.

``tritonclient`` speaks the protocol; this module adds what both front ends need on
top of it, the same way for HTTP and gRPC: finding the image-bytes ensemble and the
raw-tensor model from each other's config ``parameters`` (``image_model`` /
``tensor_model``), reading the preprocessing record for local preprocessing, top-k
answers through Triton's classification extension, the optional ``weight_map``
output, retries with backoff and jitter on what passes (a connection error, a
server refusing work because its queue is full, a model being reloaded), timeouts,
TLS and keys, and five errors a user can act on: :class:`ServerUnreachable`,
:class:`ModelUnavailable`, :class:`ServerOverloaded`, :class:`AccessDenied` and
:class:`RequestFailed`.

A locked server (the launcher's default, docs/security.md) keeps model configs and its
repository index to its operators: the client then describes the model from what stays
open, its metadata and readiness, and the export's naming (``NAME`` and ``NAME_image``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from geventhttpclient.response import HTTPConnectionClosed
from tritonclient.utils import InferenceServerException

from serve.control import INFERENCE_KEY_HEADER, ControlKeyError, grpc_headers, http_headers, read_key
from serve.endpoints import CLASSIFIER_SUFFIX, CONTROL_KEY_HEADER, IMAGE_MODEL_SUFFIX
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


class AccessDenied(ClientError):
    """The server wants a key this client did not send (or sent wrong)."""


class ServerOverloaded(RequestFailed):
    """The server shed the request (its queue was full, or the request waited past the queue
    timeout: gRPC UNAVAILABLE, HTTP 503), also after the retries. Later requests may pass."""


# What Triton's admission control says (config.pbtxt default_queue_policy): queue full, queue timeout.
OVERLOAD_MESSAGES = ("Exceeds maximum queue size", "Request timeout expired")
RESTRICTED_MESSAGE = "is restricted, expecting header"  # Triton's refusal of a locked API, HTTP and gRPC alike


@dataclass(frozen=True)
class Tls:
    """TLS to the server (gRPC straight to Triton, HTTPS to the load balancer in front of it): ``ca``
    verifies the server (default: the system's roots); ``cert`` and ``key`` are this client's
    certificate, for mutual TLS."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """The TLS and key flags every client command shares (docs/security.md)."""
    g = parser.add_argument_group("TLS and keys")
    g.add_argument("--tls", action="store_true", help="connect over TLS, verifying the server with the system's CAs")
    g.add_argument("--ca", metavar="PEM", help="connect over TLS, verifying the server with this CA certificate")
    g.add_argument("--client-cert", metavar="PEM", help="mutual TLS: this client's certificate (with --client-key)")
    g.add_argument("--client-key", metavar="PEM", help="mutual TLS: its private key")
    g.add_argument("--inference-key-file", metavar="FILE", help="for a server whose inference is locked too")


def connection_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``TritonClassifier`` keyword arguments from :func:`add_connection_args`'s flags."""
    if bool(args.client_cert) != bool(args.client_key):
        raise ClientError("mutual TLS needs both --client-cert and --client-key")
    for flag in ("ca", "client_cert", "client_key"):
        if (path := getattr(args, flag)) and not Path(path).is_file():
            raise ClientError(f"--{flag.replace('_', '-')} {path}: no such file")
    tls = Tls(args.ca, args.client_cert, args.client_key) if args.tls or args.ca or args.client_cert else None
    try:
        key = read_key(args.inference_key_file, "inference key") if args.inference_key_file else None
    except ControlKeyError as e:
        raise ClientError(str(e)) from None
    return {"tls": tls, "inference_key": key}


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
    arch: str  # "" when the server keeps its configs private
    precision: str
    num_classes: int
    preprocessing: Preprocessing | None
    max_batch_size: int
    tensor_input: str
    input_size: int  # the tensor model's square crop, from its input shape (N, H, W, 3)
    bytes_input: str | None
    classes_output: str  # the output that carries a labels file
    has_weight_map: bool

    def summary(self) -> str:
        details = ", ".join(d for d in (self.arch, self.precision, f"{self.num_classes} classes") if d)
        return f"{self.name} v{self.version} ({details})"


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


def _is_restricted(e: BaseException) -> bool:
    return isinstance(e, InferenceServerException) and RESTRICTED_MESSAGE in (e.message() or "")


def _is_overloaded(e: BaseException) -> bool:
    return isinstance(e, InferenceServerException) and any(m in (e.message() or "") for m in OVERLOAD_MESSAGES)


def _is_connection_error(e: BaseException) -> bool:
    if isinstance(e, InferenceServerException):
        return e.status() == "StatusCode.UNAVAILABLE" and not _is_overloaded(e)
    if isinstance(e, http.client.HTTPException):  # closed with no answer: a balancer's "send it again"
        return isinstance(e, HTTPConnectionClosed | http.client.RemoteDisconnected | http.client.IncompleteRead)
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


# Defaults, from the measurements in docs/performance.md#9-hung-replicas-and-the-soak-2026-11-29 (2-core CPU,
# the fleet of deploy/local_fleet.py):
# timeout: 10 s covers the load balancer's whole budget (3 tries of 3 s, serve/endpoints.py) and 5x the slowest
# healthy answer measured (p99.9 1.9 s: 8 camera photos at full load), so a healthy request never times out here.
DEFAULT_TIMEOUT_S = 10.0
# retries: 3, so that an overload refusal is tried again over about 1.3 s, the time the shipped queue takes to
# drain at 2x overload; more only adds load to a full server.
DEFAULT_RETRIES = 3
# backoff: 0.2 s doubling (0.2, 0.4, 0.8 s, each jittered to between half and all of it): 3 retries span up to
# 1.4 s, that drain time, and no more.
DEFAULT_BACKOFF_S = 0.2
# A request that timed out (a hung server, or a connection that went silent) is sent once more, on a fresh
# connection: inference is idempotent, and through a load balancer the retry finds another replica.
TIMEOUT_RETRIES = 1


# Triton's refusal of a batch over the model's max_batch_size, which names the limit.
BATCH_LIMIT = re.compile(r"batch-size must be <= (\d+)")


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
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S,
        tls: Tls | None = None,
        inference_key: str | None = None,
        control_key: str | None = None,
        resize: int | None = None,
    ) -> None:
        """``timeout``: seconds per try (10: the balancer's 3 tries of 3 s fit; healthy answers' p99.9 is 1.9 s).
        ``retries``: how often what passes is tried again (3: refusals outlast the ~1.3 s a full queue drains).
        ``backoff``: the first retry's delay, doubling (0.2 s: 3 retries span up to 1.4 s, that drain time).
        ``inference_key``: for a server whose inference is locked too. ``control_key``: the operators'
        key, for their tools only; with it the model is described from its config (preprocessing record,
        batch size, architecture). ``resize``: the shorter side before the centre crop, for local
        preprocessing when the server keeps the record private (the crop comes from the model's input)."""
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
        self.tls = tls
        self.resize = resize
        to_headers = grpc_headers if protocol == "grpc" else http_headers
        self.headers: dict[str, str] = {}
        if inference_key is not None:
            self.headers |= to_headers(inference_key, INFERENCE_KEY_HEADER)
        if control_key is not None:
            self.headers |= to_headers(control_key, CONTROL_KEY_HEADER)
        self._local = threading.local()
        self._info: ModelInfo | None = None
        self._info_lock = threading.Lock()
        self._batch_limit = 0  # the largest batch the server said it takes (0: as the config says, or not known)

    @property
    def where(self) -> str:
        name = "gRPC" if self.protocol == "grpc" else "HTTP"
        return f"{self.url} ({name}{' over TLS' if self.tls else ''})"

    # -- transport -------------------------------------------------------------------------
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            tls = self.tls
            if self.protocol == "grpc":
                client = grpcclient.InferenceServerClient(
                    self.url,
                    ssl=tls is not None,
                    root_certificates=tls and tls.ca,
                    private_key=tls and tls.key,
                    certificate_chain=tls and tls.cert,
                )
            else:
                files = (("ca_certs", tls.ca), ("certfile", tls.cert), ("keyfile", tls.key)) if tls else ()
                options = {k: v for k, v in files if v}
                client = httpclient.InferenceServerClient(
                    self.url,
                    connection_timeout=self.timeout,
                    network_timeout=self.timeout,
                    ssl=tls is not None,
                    ssl_options=options if tls else None,
                )
            self._local.client = client
        return client

    def _drop_client(self) -> None:
        """Forget this thread's connection (closed), so that the next call opens a fresh one."""
        client, self._local.client = getattr(self._local, "client", None), None
        if client is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is dropped all the same
                client.close()

    def _call(self, what: str, fn: Callable[..., T], retries: int | None = None, idempotent: bool = True) -> T:
        """``fn(client, **timeout)`` on this thread's client. What passes is retried with
        exponential backoff and jitter: connection errors (then :class:`ServerUnreachable`),
        overload refusals (then :class:`ServerOverloaded`) and a model missing while the
        server reloads it (then :class:`ModelUnavailable`). A timeout of an ``idempotent`` call
        (every call here: inference is stateless, the rest reads) is retried ``TIMEOUT_RETRIES``
        time(s) at once on a fresh connection (a hung replica behind a balancer: the retry goes to
        another), within ``retries``. Other failures raise :class:`RequestFailed` with the
        server's message at once."""
        kwargs: dict[str, Any] = {"headers": self.headers or None}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout  # HTTP: set on the client
        retries = self.retries if retries is None else retries
        attempt = timeouts = 0
        while True:
            try:
                return fn(self._client(), **kwargs)
            except (InferenceServerException, OSError, http.client.HTTPException) as e:
                if isinstance(e, http.client.HTTPException) and not _is_connection_error(e):
                    detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
                    raise ServerUnreachable(
                        f"cannot talk to Triton at {self.where}: the answer is not HTTP ({detail}); "
                        "is it the gRPC port? (--protocol grpc)"
                    ) from None
                if _is_restricted(e):
                    raise AccessDenied(f"{what}: the server at {self.where} wants a key: {_message(e)}") from None
                if _is_timeout(e):
                    if idempotent and timeouts < TIMEOUT_RETRIES and attempt < retries:
                        timeouts += 1
                        attempt += 1
                        self._drop_client()
                        continue  # no backoff: the time is already spent waiting
                    raise RequestFailed(
                        f"{what}: no answer from {self.where} within {self.timeout:g} s "
                        f"({timeouts + 1} attempt{'s' if timeouts else ''})"
                    ) from None
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                if _is_overloaded(e):
                    if attempt == retries:
                        raise ServerOverloaded(
                            f"{what}: the server at {self.where} is overloaded and refused the request "
                            f"({_message(e)}; {tries}); try again later or send less at once"
                        ) from None
                elif _is_model_missing(e):
                    if attempt == retries:
                        raise ModelUnavailable(f"{what} at {self.where}: {_message(e)}") from None
                elif not _is_connection_error(e):
                    raise RequestFailed(_message(e)) from None
                elif attempt == retries:
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

    def _metadata(self, name: str) -> dict[str, Any] | None:
        """The model's metadata (open on a locked server), None when it is not loaded."""
        try:
            return self._call(f"metadata of {name}", lambda c, **kw: c.get_model_metadata(name, **self._json(), **kw))
        except (ModelUnavailable, RequestFailed):
            return None

    def _ready(self, name: str) -> bool:
        try:
            return bool(self._call(f"readiness of {name}", lambda c, **kw: c.is_model_ready(name, **kw)))
        except (ModelUnavailable, RequestFailed):
            return False

    def _config(self, name: str) -> dict[str, Any] | None:
        """The model's config, or None when the server keeps it to its operators (or a load balancer in
        front forwards no control plane: 403, or 404 from an Ingress). Asked once: it is optional."""
        try:
            config = self._call(
                f"config of {name}", lambda c, **kw: c.get_model_config(name, **self._json(), **kw), retries=0
            )
        except (AccessDenied, RequestFailed, ModelUnavailable):
            return None
        return config.get("config", config)

    def describe(self, refresh: bool = False) -> ModelInfo:
        """Find the model and its partner (cached; ``refresh`` asks again).

        ``model`` may name the raw-tensor model or an ensemble over it (``NAME_image``, ``NAME_classifier``...).
        """
        with self._info_lock:
            if self._info is None or refresh:
                self._info = self._describe()
            return self._info

    def _require(self, name: str, role: str = "") -> dict[str, Any]:
        meta = self._metadata(name)
        if meta is None or not self._ready(name):
            problem = "is not ready" if meta is not None else "is not on the server (or not loaded)"
            raise ModelUnavailable(f"model '{name}'{role} {problem} at {self.where}")
        return meta

    def _describe(self) -> ModelInfo:
        meta = self._require(self.model)
        # The ensembles over a model are named after it (NAME_image, NAME_classifier, NAME_image_classifier).
        tensor_name = self.model.removesuffix(CLASSIFIER_SUFFIX).removesuffix(IMAGE_MODEL_SUFFIX)
        if tensor_name != self.model and self._metadata(tensor_name) is None:
            tensor_name = self.model  # a model whose own name merely ends so
        tensor_meta = meta if tensor_name == self.model else self._require(tensor_name, f" (behind '{self.model}')")
        image_name = tensor_name + IMAGE_MODEL_SUFFIX
        image_meta = self._metadata(image_name) if self._ready(image_name) else None
        outputs = {o["name"]: o for o in tensor_meta["outputs"]}
        classes = next((n for n in outputs if n != WEIGHT_MAP), next(iter(outputs)))
        params, config = {}, self._config(tensor_name)  # the operators' view: preprocessing, batch size, arch
        if config is not None:
            params = _parameters(config)
            classes = next((o["name"] for o in config["output"] if o.get("label_filename")), classes)
        pp = params.get("preprocessing")
        size = int(tensor_meta["inputs"][0]["shape"][1])
        preprocessing = Preprocessing.from_dict(json.loads(pp)) if pp else None
        if preprocessing is None and self.resize is not None:
            preprocessing = Preprocessing(resize=self.resize, crop=size)
        return ModelInfo(
            name=tensor_name,
            version=max(tensor_meta.get("versions") or ["?"], key=lambda v: int(v) if v.isdigit() else -1),
            image_model=image_name if image_meta is not None else None,
            arch=params.get("arch", ""),
            precision=params.get("precision", ""),
            num_classes=int(params.get("num_classes") or outputs[classes]["shape"][-1]),
            preprocessing=preprocessing,
            max_batch_size=int(config.get("max_batch_size", 0)) if config else 0,
            tensor_input=tensor_meta["inputs"][0]["name"],
            input_size=size,
            bytes_input=image_meta["inputs"][0]["name"] if image_meta is not None else None,
            classes_output=classes,
            has_weight_map=WEIGHT_MAP in outputs,
        )

    # -- inference -------------------------------------------------------------------------
    def _module(self) -> Any:
        return grpcclient if self.protocol == "grpc" else httpclient

    def _infer(
        self, model: str, input_name: str, data: np.ndarray, datatype: str, top_k: int, weight_map: bool
    ) -> list[Classification]:
        """One request, or one per part of a batch larger than the server takes: its config says how
        large (with the operators' key), else its refusal does (a server on a CPU takes fewer than on a GPU)."""
        info = self.describe()
        limit = self._batch_limit or info.max_batch_size
        if 0 < limit < len(data):
            parts = (data[i : i + limit] for i in range(0, len(data), limit))
            return [c for part in parts for c in self._infer(model, input_name, part, datatype, top_k, weight_map)]
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
            self._info, self._batch_limit = None, 0  # the server or the model may come back changed
            raise
        except RequestFailed as e:
            said = BATCH_LIMIT.search(str(e))
            if type(e) is not RequestFailed or not said or not 0 < int(said[1]) < len(data):
                raise
            self._batch_limit = int(said[1])
            return self._infer(model, input_name, data, datatype, top_k, weight_map)
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
