"""Lower-precision variants of an export: fp16 for GPUs, INT8 for CPU serving.

In both, the second-order part of the head (covariance, trace, Newton-Schulz,
vectorization) stays in fp32: in fp16 the trace overflows and the iterations lose
their accuracy (DESIGN §1); quantizing them to 8 bits would be worse. INT8 also keeps
the input normalization in fp32, and on request the fc that reads the second-order
descriptor (see :func:`quantize_int8` for the measurements).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.onnx_graph import second_order_nodes
from export.serving_model import ServingModel

PRECISIONS = ("fp32", "fp16", "int8")


def half_precision(serving: ServingModel) -> ServingModel:
    """A copy whose ResNet backbone runs in fp16 and whose head and fc stay fp32.

    ``ThreeGNet.forward_with_weights`` casts the backbone's features to the head's
    dtype, so the traced graph holds one explicit Cast before the head. Not only the
    second-order ops need fp32: the re-weighting stages' products overflow fp16 too
    (training with ``--amp fp16`` gave NaN descriptors, see training/train.py). The
    head is ~8% of ResNet50-3G's FLOPs.
    """
    half = copy.deepcopy(serving)
    half.model.half()
    half.model.head.float()
    half.model.fc.float()
    return half


class _Calibration(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // batch)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


def _module_path(node: onnx.NodeProto) -> list[str]:
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    return [part.split(":")[0].strip() for part in namespace.split("/")] if namespace else []


def wrapper_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes the serving wrapper itself runs, outside the model: the input
    normalization (uint8 -> float, ``* scale + shift``), the softmax and the weight map's squeeze.

    Found, like :func:`export.onnx_graph.second_order_nodes`, from the ``namespace``
    metadata the exporter writes: their module path has no module below ``ServingModel``.
    """
    return [node.name for node in graph.node if len(_module_path(node)) == 2]


def classifier_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the fc layer's nodes (module ``model.fc``): the classifier on the second-order descriptor."""
    return [node.name for node in graph.node if _module_path(node)[1:2] == ["model.fc"]]


def quantize_int8(
    fp32_path: Path, out_path: Path, calibration: np.ndarray, work_dir: Path, *, classifier_fp32: bool = False
) -> onnx.ModelProto:
    """Static INT8 (QDQ) quantization calibrated on ``calibration`` images.

    U8 activations, S8 per-channel weights and no range reduction: the choice for
    x86 CPUs with VNNI. Kept in fp32: the second-order nodes, the softmax and the serving
    wrapper's other elementwise ops (see :func:`wrapper_nodes`); with ``classifier_fp32``
    also the fc layer that reads the second-order descriptor (see below for why).
    """
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    # Softmax too: 8-bit probabilities (steps of 1/255) would be useless to clients.
    keep_fp32 = second_order_nodes(graph) + [n.name for n in graph.node if n.op_type == "Softmax"]
    # The input normalization too: quantized, its per-channel multiply-add over the whole
    # (B, 3, 224, 224) image becomes QLinearMul + QLinearAdd, which onnxruntime runs slowly
    # with a broadcast operand: 12% of the INT8 model's time at batch 8 for 0.1% of its FLOPs
    # (bench/low_precision.py, ResNet50-3G). In fp32 they take ~1%, and the first QuantizeLinear
    # then sits right before conv1: INT8 throughput 2.17x -> 2.47x fp32, top-1 agreement unchanged.
    keep_fp32 += [n for n in wrapper_nodes(graph) if n not in keep_fp32]
    # The fc, on request: quantized, its input (the 32,896 values of the matrix square root) gets
    # one 8-bit scale, set by the largest entries (the diagonal); the off-diagonal values are ~15x
    # smaller (median 1.6 quantization steps on the benchmark's model, a fifth of them round to 0).
    # Measured on ResNet50-3G with a trained head (bench/low_precision.py, 256 held-out images):
    # top-1 disagreements with fp32 6 -> 4 (97.7% -> 98.4% agreement; 4 -> 0 on the first 128),
    # throughput vs fp32 2.2-2.5x either way, within the noise (the fc is 0.5% of the FLOPs).
    # Not the default yet: on the untrained 4-class model of
    # tests/test_export.py (near-uniform probabilities, max |Δp| 0.0014) it turns 1 top-1 flip of
    # 16 into 2, under that test's 90% agreement gate, although its logits move less (0.009 -> 0.006).
    if classifier_fp32:
        keep_fp32 += classifier_nodes(graph)
    prepared = work_dir / "int8_prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    # Pre-processing renames nothing it keeps, but it may fold some of those nodes away.
    present = {n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node}
    quantize_static(
        str(prepared),
        str(out_path),
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=False,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=[n for n in keep_fp32 if n in present],
    )
    return onnx.load(str(out_path))
