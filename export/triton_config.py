"""Triton ``config.pbtxt`` files, built as Triton's own ``ModelConfig`` protobuf.

Building the message (rather than formatting text) means a misspelt field fails
here, at export time, instead of when the server loads the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serve.endpoints import CLASSIFIER_SUFFIX, IMAGE_MODEL_SUFFIX

LABELS_FILE = "labels.txt"
BYTES_INPUT = "image_bytes"

# Serving defaults, each measured (ResNet50-3G on the 2-core CPU and an H100): a reason and where its numbers are.
# Most of the GPU's batching gain (it flattens from 64 to 128) with one execution's memory and latency bounded:
# docs/performance.md#one-instance-or-two-it-depends-on-the-machine
MAX_BATCH_SIZE = 32
# On a CPU the launcher serves every model with at most this batch (serve/standin.py): under overload a full queue
# became one batch of seconds, answered after the 2 s a user waits: docs/performance.md#5-overload-admission-control
CPU_MAX_BATCH_SIZE = 4
# How long an idle instance waits for more requests: 10 ms gained no throughput and costs a lone request 10 ms:
# docs/performance.md#one-instance-or-two-it-depends-on-the-machine
QUEUE_DELAY_US = 2000
# Model instances (to_onnx.py --instances): one with all the cores on a quiet CPU; two pay off on contended cores:
# docs/performance.md#one-instance-or-two-it-depends-on-the-machine
MODEL_INSTANCES = 1
# onnxruntime threads per instance (to_onnx.py --intra-op-threads); 0: the cores shared out among the instances:
# docs/performance.md#one-instance-or-two-it-depends-on-the-machine
INTRA_OP_THREADS = 0
# No busy-waiting (to_onnx.py --allow-spinning): spinning threads took the cores the decoders and the batcher needed:
# docs/performance.md#4-serving-overhead
ALLOW_SPINNING = False
SPINNING_PARAMETER = "session.intra_op.allow_spinning"
# Decoding is single-threaded: one preprocessing instance per core (--preprocess-instances), at most 16 (~60 MB each):
# docs/performance.md#one-instance-or-two-it-depends-on-the-machine
MAX_PREPROCESS_INSTANCES = 16


def default_preprocess_instances() -> int:
    """One preprocessing instance per core this process may use, 1 to MAX_PREPROCESS_INSTANCES."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_PREPROCESS_INSTANCES))


PREPROCESS_INSTANCES = default_preprocess_instances()
# Admission control (--max-queue-size): a full queue refuses at once; 16 keeps the p99 at 2x load under 2 s here:
# docs/performance.md#5-overload-admission-control
MAX_QUEUE_SIZE = 16
# The longest an admitted request waits (--queue-timeout-ms; 0: forever): with a batch of 4 after it, answered within
# 2 s at 2x load on a CPU; above Triton 2.51's 500 ms batcher stall: docs/performance.md#5-overload-admission-control
QUEUE_TIMEOUT_MS = 1000
# Which versions Triton serves (to_onnx.py --version-policy): the newest, so an export into a served
# repository rolls out; serve/versions.py pins an older one (rollback).
VERSION_POLICY = "latest:1"


@dataclass
class ModelSpec:
    """What the configs need to know about an exported model."""

    name: str
    num_classes: int
    crop: int
    weight_map_shape: tuple[int, int] | None  # None for heads without re-weighting stages
    parameters: dict[str, Any] = field(default_factory=dict)  # recorded in every config
    max_batch_size: int = MAX_BATCH_SIZE
    tensorrt_fp16: bool = False
    instances: int = MODEL_INSTANCES
    intra_op_threads: int = INTRA_OP_THREADS
    allow_spinning: bool = ALLOW_SPINNING
    queue_timeout_ms: int = QUEUE_TIMEOUT_MS  # 0: no admission control
    max_queue_size: int = MAX_QUEUE_SIZE
    queue_delay_us: int = QUEUE_DELAY_US  # the batcher's wait for a fuller batch
    version_policy: str = VERSION_POLICY
    preprocess_instances: int = PREPROCESS_INSTANCES

    @property
    def preprocess_name(self) -> str:
        return f"{self.name}_preprocess"

    @property
    def image_name(self) -> str:
        return self.name + IMAGE_MODEL_SUFFIX

    @property
    def classifier_name(self) -> str:
        """Raw tensors in, probabilities only out: what Triton's stock ``image_client.py`` accepts."""
        return self.name + CLASSIFIER_SUFFIX

    @property
    def image_classifier_name(self) -> str:
        """Image bytes in, probabilities only out: what ``ensemble_image_client.py`` accepts."""
        return self.name + IMAGE_MODEL_SUFFIX + CLASSIFIER_SUFFIX


def _tensor(name: str, dtype: int, dims: list[int], labels: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "data_type": dtype, "dims": dims}
    if labels:
        d["label_filename"] = LABELS_FILE
    return d


def _image_input(spec: ModelSpec) -> dict[str, Any]:
    """The raw model's input, with its layout declared (Triton's image clients read ``format``)."""
    return {**_tensor("image", mc.TYPE_UINT8, [spec.crop, spec.crop, 3]), "format": mc.ModelInput.FORMAT_NHWC}


def _outputs(spec: ModelSpec) -> list[dict[str, Any]]:
    """Every output meant for classification carries the labels file."""
    outs = [
        _tensor("probabilities", mc.TYPE_FP32, [spec.num_classes], labels=True),
        _tensor("logits", mc.TYPE_FP32, [spec.num_classes], labels=True),
    ]
    if spec.weight_map_shape:
        outs.append(_tensor("weight_map", mc.TYPE_FP32, list(spec.weight_map_shape)))
    return outs


def version_policy(text: str) -> mc.ModelVersionPolicy:
    """``latest:N``, ``all`` or ``specific:V[,V...]`` as Triton's version policy."""
    kind, _, values = text.partition(":")
    try:
        numbers = [int(v) for v in values.split(",")] if values else []
    except ValueError:
        numbers = []
    if kind == "all" and not values:
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    if kind == "latest" and len(numbers) == 1 and numbers[0] >= 1:
        return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=numbers[0]))
    if kind == "specific" and numbers and min(numbers) >= 1:
        return mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=numbers))
    raise ValueError(f"version policy must be latest:N, all or specific:V[,V...]; got {text!r}")


def describe_version_policy(policy: mc.ModelVersionPolicy) -> str:
    """The inverse of :func:`version_policy`."""
    which = policy.WhichOneof("policy_choice")
    if which == "specific":
        return "specific:" + ",".join(str(v) for v in policy.specific.versions)
    if which == "all":
        return "all"
    return f"latest:{policy.latest.num_versions if which == 'latest' else 1}"


def dynamic_batching(spec: ModelSpec) -> mc.ModelDynamicBatching:
    """The batcher with its admission control: requests that waited ``queue_timeout_ms`` in the
    queue, or that find ``max_queue_size`` requests ahead of them, are refused (UNAVAILABLE)."""
    batching = mc.ModelDynamicBatching(max_queue_delay_microseconds=spec.queue_delay_us)
    if spec.queue_timeout_ms > 0 or spec.max_queue_size > 0:
        policy = batching.default_queue_policy
        policy.max_queue_size = spec.max_queue_size
        if spec.queue_timeout_ms > 0:
            policy.timeout_action = mc.ModelQueuePolicy.REJECT
            policy.default_timeout_microseconds = 1000 * spec.queue_timeout_ms
            policy.allow_timeout_override = True
    return batching


def _parameters(cfg: mc.ModelConfig, params: dict[str, Any]) -> None:
    for key, value in params.items():
        cfg.parameters[key].string_value = value if isinstance(value, str) else json.dumps(value)


def onnx_model_config(spec: ModelSpec) -> mc.ModelConfig:
    """The raw-tensor model for Triton's onnxruntime backend.

    No ``kind`` in the instance group: Triton places it on the GPU when there is one
    and on the CPU otherwise, so one repository serves both.
    """
    cfg = mc.ModelConfig(
        name=spec.name,
        backend="onnxruntime",
        max_batch_size=spec.max_batch_size,
        input=[_image_input(spec)],
        output=_outputs(spec),
        dynamic_batching=dynamic_batching(spec),
        version_policy=version_policy(spec.version_policy),
        instance_group=[mc.ModelInstanceGroup(count=spec.instances)],
        model_warmup=[
            mc.ModelWarmup(  # the largest batch: onnxruntime sizes its memory arena at load, not at a burst
                name="zeros",
                batch_size=spec.max_batch_size,
                inputs={
                    "image": mc.ModelWarmup.Input(
                        data_type=mc.TYPE_UINT8, dims=[spec.crop, spec.crop, 3], zero_data=True
                    )
                },
            )
        ],
    )
    if spec.tensorrt_fp16:
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16"
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
        trt.parameters["trt_engine_cache_enable"] = "1"
        trt.parameters["trt_engine_cache_path"] = "/tmp/triton_trt_cache"
    _parameters(
        cfg,
        {
            **spec.parameters,
            "image_model": spec.image_name,
            "intra_op_thread_count": str(spec.intra_op_threads),
            SPINNING_PARAMETER: "1" if spec.allow_spinning else "0",
        },
    )
    return cfg


def preprocess_model_config(spec: ModelSpec, preprocessing: dict[str, Any]) -> mc.ModelConfig:
    """The python-backend model that turns encoded image bytes into the model's input."""
    cfg = mc.ModelConfig(
        name=spec.preprocess_name,
        backend="python",
        max_batch_size=spec.max_batch_size,
        input=[_tensor(BYTES_INPUT, mc.TYPE_STRING, [1])],
        output=[_tensor("image", mc.TYPE_UINT8, [spec.crop, spec.crop, 3])],
        dynamic_batching=dynamic_batching(spec),
        instance_group=[mc.ModelInstanceGroup(count=spec.preprocess_instances, kind=mc.ModelInstanceGroup.KIND_CPU)],
    )
    _parameters(cfg, {"preprocessing": preprocessing})
    return cfg


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> mc.ModelEnsembling.Step:
    return mc.ModelEnsembling.Step(model_name=model, model_version=-1, input_map=inputs, output_map=outputs)


def _ensemble(spec: ModelSpec, name: str, bytes_in: bool, outputs: list[dict[str, Any]]) -> mc.ModelConfig:
    """An ensemble over the raw model: from image bytes (through the preprocessing model) or from
    tensors, exposing ``outputs`` (a subset costs nothing: the raw model serves them all)."""
    names = {o["name"]: o["name"] for o in outputs}
    if bytes_in:
        steps = [
            _step(spec.preprocess_name, {BYTES_INPUT: BYTES_INPUT}, {"image": "preprocessed_image"}),
            _step(spec.name, {"image": "preprocessed_image"}, names),
        ]
        inputs = [_tensor(BYTES_INPUT, mc.TYPE_STRING, [1])]
    else:
        steps, inputs = [_step(spec.name, {"image": "image"}, names)], [_image_input(spec)]
    cfg = mc.ModelConfig(
        name=name,
        platform="ensemble",
        max_batch_size=spec.max_batch_size,
        input=inputs,
        output=outputs,
        ensemble_scheduling=mc.ModelEnsembling(step=steps),
    )
    _parameters(cfg, {**spec.parameters, "tensor_model": spec.name})
    return cfg


def ensemble_config(spec: ModelSpec) -> mc.ModelConfig:
    """Encoded image bytes in, the model's outputs out: preprocess, then the ONNX model."""
    return _ensemble(spec, spec.image_name, bytes_in=True, outputs=_outputs(spec))


def classifier_configs(spec: ModelSpec) -> list[mc.ModelConfig]:
    """The two single-purpose classifiers that Triton's stock example clients run unchanged:
    one output (FP32 probabilities with labels) over raw NHWC tensors, and over image bytes."""
    probabilities = [o for o in _outputs(spec) if o["name"] == "probabilities"]
    return [
        _ensemble(spec, spec.classifier_name, bytes_in=False, outputs=probabilities),
        _ensemble(spec, spec.image_classifier_name, bytes_in=True, outputs=probabilities),
    ]


def to_pbtxt(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse_pbtxt(text: str) -> mc.ModelConfig:
    """Parse a ``config.pbtxt``; unknown or misspelt fields raise ``ParseError``."""
    return text_format.Parse(text, mc.ModelConfig())
