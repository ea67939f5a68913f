"""Lower-precision variants of an export: fp16 for GPUs, INT8 for CPU serving.

In both, the second-order part of the head (covariance, trace, Newton-Schulz,
vectorization) stays in fp32: in fp16 the trace overflows and the iterations lose
their accuracy (docs/export.md); quantizing them to 8 bits would be worse. INT8 also keeps
the input normalization in fp32, and the layers its recipe names (:data:`FP32_MODULES`,
chosen by measured sensitivity).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.onnx_graph import module_path, second_order_nodes
from export.serving_model import ServingModel

PRECISIONS = ("fp32", "fp16", "int8")


def half_precision(serving: ServingModel) -> ServingModel:
    """A copy whose ResNet backbone runs in fp16 and whose head and fc stay fp32.

    What stays fp32 is the model's rule (``ThreeGNet.FP16_FP32_MODULES``, the same as for
    training with ``--amp fp16``); ``ThreeGNet.forward_with_weights`` casts the backbone's
    features to the head's dtype, so the traced graph holds one explicit Cast before the head.
    """
    half = copy.deepcopy(serving)
    half.model.half_backbone()
    return half


class _Calibration(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // batch)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


def wrapper_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes the serving wrapper itself runs, outside the model: the input
    normalization (uint8 -> float, ``* scale + shift``), the softmax and the weight map's squeeze.

    Found, like :func:`export.onnx_graph.second_order_nodes`, from the ``namespace``
    metadata the exporter writes: their module path has no module below ``ServingModel``.
    """
    return [node.name for node in graph.node if len(module_path(node)) == 2]


def module_nodes(graph: onnx.GraphProto, modules: tuple[str, ...]) -> list[str]:
    """Names of the nodes that belong to ``modules`` (module paths such as ``model.fc`` or
    ``model.head.AtMp1``, at any depth). A convolution followed by a BatchNorm is one fused Conv
    in the graph, named after the BatchNorm (ResNet's first convolution is ``model.bn1``)."""
    wanted = set(modules)
    return [node.name for node in graph.node if wanted & set(module_path(node)[1:])]


def missing_modules(graph: onnx.GraphProto, modules: tuple[str, ...]) -> list[str]:
    """Those of ``modules`` that name no node of ``graph`` (a typo would otherwise keep nothing in fp32)."""
    return [m for m in modules if not module_nodes(graph, (m,))]


# The INT8 recipe: modules kept in fp32 besides the second-order part and the serving wrapper, and how
# activations are calibrated. From a per-layer sensitivity study on ResNet50-3G with a trained head
# (python -m bench.studies.int8 --sensitivity; docs/performance.md section 3). The fc stays fp32: its input, the
# 32,896 values of the matrix square root, would get one 8-bit scale set by the diagonal, ~15x the
# off-diagonal entries, and it is 0.5% of the FLOPs. Ranges are the average of the per-batch ranges
# (onnxruntime's CalibMovingAverage): plain MinMax takes the most extreme batch's, and more images made
# its steps coarser. What is left are top-1 flips on near-ties, 3-4x as many as bf16 autocast makes
# (2048 held-out images: 23-32 against 8, by calibration set), from 8-bit noise on both sides: re-run at
# other bit widths (bench/studies/int8.py), 8-bit activations alone make 2.7x bf16's noise and 8-bit weights
# alone 2.0x; bf16's level takes about 10 bits on both, which onnxruntime's CPU kernels lack. Keeping the
# first layers (conv1, fused with bn1 and named after it, and layer1) fp32 halves the flips, 11-16, but
# INT8 then runs 2.3x fp32 instead of 2.7x: under the 2.5x target, so not the default (to_onnx.py
# --int8-fp32-modules exports it; bench/low_precision.py measures it beside the default).
FP32_MODULES: tuple[str, ...] = ("model.fc",)
EARLY_FP32_MODULES: tuple[str, ...] = ("model.fc", "model.bn1", "model.layer1")
CALIBRATION_OPTIONS: dict[str, object] = {"CalibMovingAverage": True}
# Calibration images the export reads at most (to_onnx.py --max-images): 32, 64 and 128 training images
# gave 23-32 flips in 2048 with no trend (the choice of images moved it as much as their number).
CALIBRATION_IMAGES = 64


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    work_dir: Path,
    *,
    fp32_modules: tuple[str, ...] = FP32_MODULES,
    calibration_options: dict[str, object] | None = None,
) -> onnx.ModelProto:
    """Static INT8 (QDQ) quantization calibrated on ``calibration`` images.

    U8 activations, S8 per-channel weights and no range reduction: the choice for x86
    CPUs with VNNI. Kept in fp32: the second-order nodes, the softmax, the serving
    wrapper's other elementwise ops (see :func:`wrapper_nodes`) and ``fp32_modules``.
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
    keep_fp32 += [n for n in module_nodes(graph, fp32_modules) if n not in keep_fp32]
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
        extra_options=dict(CALIBRATION_OPTIONS if calibration_options is None else calibration_options),
    )
    return onnx.load(str(out_path))
