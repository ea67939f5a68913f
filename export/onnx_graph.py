"""Tracing the serving model into ONNX, checking the graph, and recording metadata in it."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import torch

from export.serving_model import ServingModel

OPSET = 18
INPUT = "image"
OUTPUTS = ("probabilities", "logits", "weight_map")
# Control flow or run-time index computation would mean the export went wrong:
# the Newton-Schulz loop must be unrolled and the triangular index a constant.
FORBIDDEN_OPS = frozenset({"Loop", "Scan", "If", "NonZero", "Trilu"})
TRACE_BATCH = 2  # verification then uses batch sizes on both sides of it


class GraphError(RuntimeError):
    """The exported graph is not what the serving stack relies on."""


def output_names(serving: ServingModel) -> list[str]:
    return list(OUTPUTS if serving.has_weight_map else OUTPUTS[:2])


def export_onnx(serving: ServingModel, path: str | Path, crop: int, opset: int = OPSET) -> onnx.ModelProto:
    """Trace ``serving`` (torch.export) into a single-file ONNX model with a dynamic batch."""
    serving.eval()
    example = torch.zeros(TRACE_BATCH, crop, crop, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            serving,
            (example,),
            input_names=[INPUT],
            output_names=output_names(serving),
            dynamic_shapes={"image": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))
    return onnx.load(str(path))


def check_graph(model: onnx.ModelProto) -> dict[str, int]:
    """``onnx.checker`` (full check, strict shape inference) plus this project's rules.

    Returns the operator histogram. Raises :class:`GraphError` on a forbidden op, a
    batch dimension that is not dynamic, or outputs without inferred shapes.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphError(f"ONNX checker: {e}") from None
    ops = Counter(node.op_type for node in inferred.graph.node)
    bad = sorted(FORBIDDEN_OPS & set(ops))
    if bad:
        raise GraphError(f"graph holds {', '.join(bad)}: control flow or run-time indexing was traced")
    for value in [*inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            raise GraphError(f"{value.name}: batch dimension is not dynamic")
        if any(not d.dim_param and d.dim_value <= 0 for d in dims):
            raise GraphError(f"{value.name}: shape not fully inferred")
    return dict(ops)


def module_path(node: onnx.NodeProto) -> list[str]:
    """Where ``node`` was traced, from the ``namespace`` metadata the exporter writes on every node:
    ``""`` (the serving wrapper), the module paths below it (``model.head``, ``model.head.AtMp1`` ...)
    and last the op itself (``mul_445``); ``[]`` for a node without that metadata."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    return [part.split(":")[0].strip() for part in namespace.split("/")] if namespace else []


def second_order_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the covariance / Newton-Schulz / vectorization nodes.

    These must stay in fp32 (docs/export.md, low precision) when the rest of the model is quantized. The
    exporter records each node's module path in its ``namespace`` metadata; the
    second-order ops are those called by the head itself or its vectorizer, not by
    its convolution stages.
    """
    names = []
    for node in graph.node:
        path = module_path(node)
        if len(path) >= 3 and path[1].endswith("head") and (len(path) == 3 or path[2].endswith("head.vectorize")):
            names.append(node.name)
    return names


def set_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Write ``metadata`` into ``metadata_props`` (non-string values as JSON)."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, without loading its weights."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
