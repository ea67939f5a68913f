"""Where the INT8 flips come from: bench/studies/int8.py's bit widths (the INT8 graph re-run at other bit
widths rounds what it says and nothing else) and its sensitivity (one module at a time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from bench.common import Settings, build_serving, export, images
from bench.studies.int8 import _activation_grid, simulate
from export.precision import quantize_int8

OUTPUTS = ("probabilities", "logits", "weight_map")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, np.ndarray]:
    """A small 3G-Net exported in fp32 and quantized by the export's recipe: (fp32, int8, prepared, images)."""
    work = tmp_path_factory.mktemp("bit_widths")
    settings = Settings.make(quick=True)
    serving, _ = build_serving(settings)
    fp32 = export(serving, work / "fp32.onnx", settings.crop)
    x = images(8, settings.crop, seed=1)
    int8 = work / "int8.onnx"
    quantize_int8(fp32, int8, images(16, settings.crop), work)
    return fp32, int8, work / "int8_prepared.onnx", x


def run(path: Path, x: np.ndarray, names: tuple[str, ...] | list[str] = OUTPUTS) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(None, {"image": x}), strict=True))


def test_nothing_rounded_gives_back_the_fp32_model(quantized, tmp_path):
    fp32, int8, prepared, x = quantized
    reference, quantized_out = run(fp32, x), run(int8, x)
    back = run(simulate(int8, prepared, tmp_path / "fp32_again.onnx", None, None), x)
    for name in OUTPUTS:
        scale = np.abs(reference[name]).max()
        assert np.abs(back[name] - reference[name]).max() <= 1e-5 * scale, name
    # ... which the INT8 model is not: the check above can tell them apart (this untrained model's
    # weight map is saturated at 1, so the logits say it).
    assert np.abs(quantized_out["logits"] - reference["logits"]).max() > 1e-3 * np.abs(reference["logits"]).max()
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fp32_again.onnx")).graph.node]
    assert "QuantizeLinear" not in ops


@pytest.mark.parametrize("bits", [8, 10, 12])
def test_activations_are_rounded_to_the_asked_grid_over_the_calibrated_range(quantized, tmp_path, bits):
    _, int8, prepared, x = quantized
    path = simulate(int8, prepared, tmp_path / "sim.onnx", bits, None)
    model = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    pairs = []
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
        scale, zero_point = float(values[q.input[1]]), int(values[q.input[2]])
        assert values[q.input[2]].dtype == (np.uint8 if bits == 8 else np.uint16)
        pairs.append((q.input[0], dq.output[0], scale, zero_point))
    assert len(pairs) == sum(
        n.op_type == "QuantizeLinear" and n.input[0] not in original for n in onnx.load(str(int8)).graph.node
    )
    out = run(path, x, sorted({name for p in pairs for name in p[:2]}))
    levels = 2**bits - 1
    for source, rounded, scale, zero_point in pairs:
        low, high = -zero_point * scale, (levels - zero_point) * scale
        inside = (out[source] >= low) & (out[source] <= high)
        error = np.abs(out[rounded] - out[source])[inside]
        assert error.size == 0 or error.max() <= 0.5 * scale * (1 + 1e-3) + 1e-6, source
        assert len(np.unique(out[rounded])) <= levels + 1
        if zero_point == 0:  # the clamp stands for a ReLU the quantizer folded away
            assert out[rounded].min() >= 0


def test_finer_grids_cover_what_the_8_bit_grid_covers():
    for zero_point in (0, 3, 128, 250):
        scale = 0.02
        low8, high8 = -zero_point * scale, (255 - zero_point) * scale
        for bits in (10, 12, 16):
            s, z = _activation_grid(scale, zero_point, bits)
            low, high = -z * s, (2**bits - 1 - z) * s
            assert s < scale / 3
            # Half an 8-bit step past both ends, give or take half a fine step for the integer zero point.
            assert high >= high8 + 0.5 * scale - 0.5 * s
            assert low <= (0 if zero_point == 0 else low8 - 0.5 * scale + 0.5 * s)
            if zero_point == 0:
                assert z == 0


def test_rounded_weights_keep_the_per_channel_grid(quantized, tmp_path):
    _, int8, prepared, _ = quantized
    fp32_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(prepared)).graph.initializer}
    model = onnx.load(str(simulate(int8, prepared, tmp_path / "w6.onnx", None, 6)))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    rounded = [n for n in values if n.endswith("_DequantizeLinear_Output")]
    assert rounded
    for name in rounded:
        w, r = fp32_weights[name.removesuffix("_DequantizeLinear_Output")], values[name]
        step = np.abs(w).reshape(len(w), -1).max(1) / 31
        per_channel = r.reshape(len(r), -1)
        assert np.all(np.abs(per_channel - w.reshape(len(w), -1)).max(1) <= 0.5 * step * (1 + 1e-5) + 1e-12)
        codes = per_channel / np.where(step == 0, 1, step)[:, None]
        assert np.allclose(codes, np.round(codes), atol=1e-3) and np.abs(codes).max() <= 31 + 1e-3


def test_study_reports_every_configuration_against_fp32(quantized, tmp_path):
    from bench.studies.int8 import CONFIGURATIONS, HEADERS, study
    from export.verify import probabilities

    fp32, int8, prepared, x = quantized
    reference = probabilities(fp32, x)
    rows, markdown = study(int8, prepared, x, reference, tmp_path, {"fp32 itself": reference})
    assert [(r.get("activation_bits"), r.get("weight_bits")) for r in rows[:-1]] == list(CONFIGURATIONS)
    assert rows[-1]["configuration"] == "fp32 itself"
    assert rows[-1]["top1_changes"] == 0 and rows[-1]["rms_diff_top2_log_odds"] == 0
    assert all(r["rms_diff_top2_log_odds"] > 0 for r in rows[:-1])  # every configuration rounds something
    assert "| " + " | ".join(HEADERS) + " |" in markdown and markdown.count("\n| ") == len(rows) + 1
    assert not list(tmp_path.glob("sim_*.onnx"))  # the simulated graphs are not left behind


def test_sensitivity_quantizes_one_module_at_a_time(quantized, tmp_path):
    from bench.studies.int8 import sensitivity

    fp32, _, _, x = quantized
    rows, markdown = sensitivity(fp32, images(16, 64), x, tmp_path)
    groups = [r["group"] for r in rows]
    assert {"model.bn1", "model.layer1", "model.layer4", "model.fc"} <= set(groups), groups
    assert any(g.startswith("model.head.") for g in groups)  # the head's own layers, each alone
    for row in rows:
        assert row["nodes"] > 0 and 0 <= row["top1_changes"] <= len(x)
        assert len(row["fp32_margins_where_changed"]) == row["top1_changes"]
        assert 0 < row["max_abs_diff_probability"] <= 1  # each quantizes something, so something moves
    assert markdown.count("\n| ") == len(rows) + 1
