"""Lower-precision variants of an export: fp16 for GPUs, INT8 for CPU serving.

In both, the second-order part of the head (covariance, trace, Newton-Schulz,
vectorization) stays in fp32: in fp16 the trace overflows and the iterations lose
their accuracy (DESIGN §1); quantizing them to 8 bits would be worse.
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
    """A copy whose backbone and re-weighting stages run in fp16.

    The head casts its features to fp32 before the covariance (see
    ``GlobalGaussianHead.forward``), so the traced graph holds an explicit Cast
    and the second-order ops, like the fc layer kept in fp32 here, stay in fp32.
    """
    half = copy.deepcopy(serving)
    half.model.half()
    half.model.fc.float()
    return half


class _Calibration(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 8) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // batch)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, work_dir: Path) -> onnx.ModelProto:
    """Static INT8 (QDQ) quantization calibrated on ``calibration`` images.

    U8 activations, S8 per-channel weights and no range reduction: the choice for
    x86 CPUs with VNNI. The second-order nodes are excluded from quantization.
    """
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    # Softmax too: 8-bit probabilities (steps of 1/255) would be useless to clients.
    keep_fp32 = second_order_nodes(graph) + [n.name for n in graph.node if n.op_type == "Softmax"]
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
