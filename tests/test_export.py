"""export/to_onnx.py: the repository it writes, the graph, metadata, versions and bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf.text_format import ParseError
from helpers import ROOT, TINY_CLASSES, released_checkpoint

from export.onnx_graph import module_path, read_metadata
from export.serving_model import ServingModel
from export.to_onnx import main as export_main
from export.triton_config import PREPROCESS_INSTANCES, parse_pbtxt
from export.verify import VerificationError, agreement, check_agreement
from training.checkpoint import load_model


def run_export(*args: str) -> subprocess.CompletedProcess:
    """The CLI exactly as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "export" / "to_onnx.py"), *args], capture_output=True, text=True, cwd=ROOT
    )


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*")} if directory.exists() else {}


def test_repository_layout_and_configs(model_repository):
    for name in ("threegnet", "threegnet_preprocess", "threegnet_image"):
        cfg = parse_pbtxt((model_repository / name / "config.pbtxt").read_text())  # Triton's own protobuf
        assert cfg.name == name
    raw = parse_pbtxt((model_repository / "threegnet" / "config.pbtxt").read_text())
    assert raw.backend == "onnxruntime" and raw.max_batch_size >= 8
    assert raw.dynamic_batching.max_queue_delay_microseconds > 0
    assert [i.name for i in raw.input] == ["image"] and list(raw.input[0].dims) == [64, 64, 3]
    assert [o.name for o in raw.output] == ["probabilities", "logits", "weight_map"]
    assert raw.output[0].label_filename == "labels.txt"
    assert raw.model_warmup and raw.instance_group[0].count == 1 and not raw.instance_group[0].kind
    assert json.loads(raw.parameters["preprocessing"].string_value)["crop"] == 64
    ens = parse_pbtxt((model_repository / "threegnet_image" / "config.pbtxt").read_text())
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["threegnet_preprocess", "threegnet"]
    assert (model_repository / "threegnet" / "1" / "model.onnx").exists()
    for name in ("threegnet", "threegnet_image"):
        assert (model_repository / name / "labels.txt").read_text().splitlines() == TINY_CLASSES
    pre = model_repository / "threegnet_preprocess" / "1"
    assert {p.name for p in pre.iterdir()} == {"model.py", "threegnet_preprocessing.py"}


def test_a_misspelt_config_field_fails_to_parse(model_repository):
    text = (model_repository / "threegnet" / "config.pbtxt").read_text()
    with pytest.raises(ParseError):
        parse_pbtxt(text.replace("max_batch_size", "max_batch_sise"))


def test_graph_is_traced_flat_with_a_dynamic_batch(model_repository):
    model = onnx.load(str(model_repository / "threegnet" / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Loop", "Scan", "If", "NonZero", "Trilu"}
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == 13  # covariance + 12 Newton-Schulz products
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]
    assert [o.name for o in model.graph.output] == ["probabilities", "logits", "weight_map"]


def test_metadata_records_what_clients_and_operators_need(model_repository, tiny_checkpoint):
    meta = read_metadata(model_repository / "threegnet" / "1" / "model.onnx")
    assert meta["arch"] == "resnet18_3g" and json.loads(meta["num_classes"]) == 4
    pp = json.loads(meta["preprocessing"])
    assert (pp["resize"], pp["crop"], pp["layout"]) == (73, 64, "NHWC")
    assert pp["mean"] == [0.485, 0.456, 0.406] and pp["std"] == [0.229, 0.224, 0.225]
    assert json.loads(meta["input"])["name"] == "image"
    assert json.loads(meta["outputs"]) == ["probabilities", "logits", "weight_map"]
    assert json.loads(meta["labels"]) == TINY_CLASSES
    assert meta["source_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert "threegnet-serving" in meta["exporter"] and "torch" in meta["exporter"]


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_reproduces_pytorch(model_repository, tiny_checkpoint, batch):
    loaded = load_model(tiny_checkpoint)
    serving = ServingModel(loaded.model, loaded.preprocessing).eval()
    x = np.random.default_rng(batch).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(model_repository / "threegnet" / "1" / "model.onnx"))
    probs, logits, wmap = sess.run(None, {"image": x})
    with torch.no_grad():
        ref = [t.numpy() for t in serving(torch.from_numpy(x))]
    np.testing.assert_allclose(logits, ref[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probs, ref[0], atol=1e-5)
    np.testing.assert_allclose(wmap, ref[2], atol=1e-5)
    assert wmap.shape == (batch, 4, 4)


def test_cli_prints_the_verification(tiny_checkpoint, tmp_path):
    result = run_export("--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / "repo"), "--name", "m")
    assert result.returncode == 0, result.stderr
    assert "max |Δ probability|" in result.stderr and "top-1 agreement = 100.0%" in result.stderr
    assert "batch sizes 1, 3" in result.stderr  # 1 and more than the traced batch of 2
    assert (tmp_path / "repo" / "m" / "1" / "model.onnx").exists()
    assert (tmp_path / "repo" / "m_image" / "config.pbtxt").exists()


def test_versions_are_never_overwritten_silently(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    args = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo)]
    assert export_main(args) == 0
    first = (repo / "threegnet" / "1" / "model.onnx").stat().st_mtime_ns
    assert export_main(args) == 0  # the next version, the first kept
    assert sorted(p.name for p in (repo / "threegnet").iterdir() if p.is_dir()) == ["1", "2"]
    assert (repo / "threegnet" / "1" / "model.onnx").stat().st_mtime_ns == first
    result = run_export(*args, "--version", "1")
    assert result.returncode == 2 and "exists; pass --force" in result.stderr
    assert (repo / "threegnet" / "1" / "model.onnx").stat().st_mtime_ns == first
    assert export_main([*args, "--version", "1", "--force"]) == 0
    # The export is deterministic: an identical model is left alone (a serving launcher reloads what changes)...
    assert (repo / "threegnet" / "1" / "model.onnx").stat().st_mtime_ns == first
    labels = tmp_path / "labels.txt"
    labels.write_text("w\nx\ny\nz\n")
    assert export_main([*args, "--version", "1", "--force", "--labels", str(labels)]) == 0
    # ...and a different one (other labels, recorded in the ONNX metadata) replaces it.
    assert (repo / "threegnet" / "1" / "model.onnx").stat().st_mtime_ns != first
    assert not [p for p in (repo / "threegnet").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda d: d / "missing.pth.tar", "missing.pth.tar: no such file"),
        (lambda d: (d / "notes.pth").write_text("not a checkpoint") and d / "notes.pth", "not a readable PyTorch"),
        (lambda d: torch.save({"weights": [1, 2]}, d / "other.pt") or d / "other.pt", "no model state dict found"),
    ],
)
def test_bad_checkpoints_fail_cleanly_and_write_nothing(tmp_path, make_input, message):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("user file")
    before = snapshot(repo)
    result = run_export("--checkpoint", str(make_input(tmp_path)), "--output-dir", str(repo))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert snapshot(repo) == before


def test_unknown_arch_is_refused(tiny_checkpoint, tmp_path):
    result = run_export("--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path), "--arch", "vgg16")
    assert result.returncode == 2 and "invalid choice: 'vgg16'" in result.stderr


def test_arch_that_does_not_match_the_weights(tiny_checkpoint, tmp_path):
    args = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / "r")]
    result = run_export(*args, "--arch", "resnet50_3g")
    assert result.returncode == 2
    assert "does not match resnet50_3g" in result.stderr and "missing keys" in result.stderr
    assert not (tmp_path / "r" / "threegnet").exists()


def test_labels_that_do_not_fit(tiny_checkpoint, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    args = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / "r")]
    result = run_export(*args, "--labels", str(labels))
    assert result.returncode == 2 and "has 3 labels but the model has 4 classes" in result.stderr
    assert not (tmp_path / "r" / "threegnet").exists()


def test_an_unwritable_output_dir_is_refused_naming_it(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_export("--checkpoint", str(tiny_checkpoint), "--output-dir", str(blocker / "repo"))
    assert result.returncode == 2 and f"cannot write to {blocker / 'repo'}" in result.stderr


def test_int8_needs_calibration_images(tiny_checkpoint, tmp_path):
    result = run_export("--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path), "--precision", "int8")
    assert result.returncode == 2 and "--calibration-images" in result.stderr


def calibration_images(folder: Path, count: int = 16) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_int8_keeps_the_second_order_head_and_softmax_in_fp32(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    images = calibration_images(tmp_path / "calib")
    args = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo)]
    result = run_export(*args, "--precision", "int8", "--calibration-images", str(images))
    assert result.returncode == 0, result.stderr
    assert "int8 ONNX vs fp32 ONNX" in result.stderr and "top-1 agreement" in result.stderr
    model = onnx.load(str(repo / "threegnet" / "1" / "model.onnx"))
    producers = {out: node for node in model.graph.node for out in node.output}
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 13  # none became MatMulInteger or lost its fp32 inputs
    for node in matmuls:
        assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers)
    (softmax,) = [n for n in model.graph.node if n.op_type == "Softmax"]
    consumers = [n.op_type for n in model.graph.node if softmax.output[0] in n.input]
    assert "QuantizeLinear" not in consumers
    assert read_metadata(repo / "threegnet" / "1" / "model.onnx")["precision"] == "int8"


def test_int8_keeps_the_modules_asked_for_in_fp32(tiny_checkpoint, tmp_path):
    from export.precision import module_nodes

    images = calibration_images(tmp_path / "calib")
    args = ["--checkpoint", str(tiny_checkpoint), "--precision", "int8", "--calibration-images", str(images)]
    early = ["model.fc", "model.bn1", "model.layer1"]
    result = run_export(*args, "--output-dir", str(tmp_path / "repo"), "--int8-fp32-modules", *early)
    assert result.returncode == 0, result.stderr
    assert "model.fc, model.bn1, model.layer1 kept in fp32" in result.stderr
    model = onnx.load(str(tmp_path / "repo" / "threegnet" / "1" / "model.onnx"))
    producers = {out: node for node in model.graph.node for out in node.output}

    def quantized_convs(module: str) -> list[bool]:
        names = set(module_nodes(model.graph, (module,)))
        convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name in names]
        assert convs, module
        return [n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear" for n in convs]

    assert not any(quantized_convs("model.bn1")) and not any(quantized_convs("model.layer1"))
    assert all(quantized_convs("model.layer2"))  # the rest is still INT8
    meta = read_metadata(tmp_path / "repo" / "threegnet" / "1" / "model.onnx")
    assert json.loads(meta["verification"])["int8_fp32_modules"] == early
    # A module the model does not have is named, not silently ignored, and nothing is written.
    typo = run_export(*args, "--output-dir", str(tmp_path / "typo"), "--int8-fp32-modules", "model.fc", "model.layr1")
    assert typo.returncode == 2 and "no module model.layr1 in this model" in typo.stderr, typo.stderr
    assert not (tmp_path / "typo" / "threegnet" / "1").exists()


def test_int8_gate_allows_flips_on_near_ties_only_and_no_lost_accuracy():
    reference = np.array([[0.60, 0.30, 0.10], [0.40, 0.39, 0.21], [0.20, 0.70, 0.10]])
    labels = np.array([0, 1, 1])  # fp32 gets 2 of 3 right
    near_tie_flip = np.array([[0.55, 0.35, 0.10], [0.39, 0.40, 0.21], [0.20, 0.70, 0.10]])
    a = agreement(near_tie_flip, reference, labels)
    assert (a.images, a.confident, a.confident_disagreements) == (3, 2, 0)
    assert a.disagreement_margins == pytest.approx([0.01]) and a.top1_agreement == pytest.approx(2 / 3)
    check_agreement(a, "int8")  # a near tie may go either way; accuracy did not drop (3 of 3 right)
    confident_flip = np.array([[0.30, 0.60, 0.10], [0.40, 0.39, 0.21], [0.20, 0.70, 0.10]])
    with pytest.raises(VerificationError, match=r"1 of the 2 images where fp32's top-1 margin is >= 0\.1"):
        check_agreement(agreement(confident_flip, reference, labels), "int8")
    lost = agreement(reference, reference, labels)
    lost.accuracy = 0.99 * lost.accuracy_reference
    with pytest.raises(VerificationError, match=r"accuracy 66.0% is under 99.5% of fp32's 66.7%"):
        check_agreement(lost, "int8")


def labelled_images(folder: Path, per_class: int = 12) -> Path:
    """Noise images in class folders named as the tiny model's labels (what --verify-images reads)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for name in TINY_CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def test_int8_export_prints_agreement_and_accuracy_and_refuses_below_the_gate(tiny_checkpoint, tmp_path):
    calibration, held_out = calibration_images(tmp_path / "calib"), labelled_images(tmp_path / "val")
    args = ["--checkpoint", str(tiny_checkpoint), "--precision", "int8", "--calibration-images", str(calibration),
            "--verify-images", str(held_out)]  # fmt: skip
    result = run_export(*args, "--output-dir", str(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if "int8 vs fp32: top-1 agreement" in x)
    assert f"on {12 * len(TINY_CLASSES)} images" in line and "accuracy" in line and "vs fp32" in line
    meta = read_metadata(tmp_path / "repo" / "threegnet" / "1" / "model.onnx")
    assert json.loads(meta["verification"])["int8_agreement"] in line
    # Every image "confident" (margin 0): any top-1 change at all must now refuse the export, and write nothing.
    differ = int(line.split(" differ;")[0].rsplit("(", 1)[1])
    strict = run_export(*args, "--output-dir", str(tmp_path / "strict"), "--int8-confident-margin", "0")
    if differ:
        assert strict.returncode == 2 and "the INT8 model refused" in strict.stderr, strict.stderr
        assert not (tmp_path / "strict" / "threegnet" / "1").exists()
    else:
        assert strict.returncode == 0, strict.stderr


def test_preprocessing_instances_follow_the_cores_or_the_flag(tiny_checkpoint, tmp_path):
    import os

    assert max(1, min(len(os.sched_getaffinity(0)), 16)) == PREPROCESS_INSTANCES
    args = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / "repo")]
    assert export_main(args) == 0
    config = parse_pbtxt((tmp_path / "repo" / "threegnet_preprocess" / "config.pbtxt").read_text())
    assert config.instance_group[0].count == PREPROCESS_INSTANCES
    assert export_main([*args, "--preprocess-instances", "5"]) == 0
    config = parse_pbtxt((tmp_path / "repo" / "threegnet_preprocess" / "config.pbtxt").read_text())
    assert config.instance_group[0].count == 5


def test_fp16_keeps_the_head_in_fp32(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    result = run_export("--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo), "--precision", "fp16")
    assert result.returncode == 0, result.stderr
    assert "fp16 ONNX vs PyTorch fp32" in result.stderr
    model = onnx.shape_inference.infer_shapes(onnx.load(str(repo / "threegnet" / "1" / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}

    def in_head(node: onnx.NodeProto) -> bool:
        return "model.head" in module_path(node)

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    backbone, head = [n for n in convs if not in_head(n)], [n for n in convs if in_head(n)]
    assert backbone and all(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in backbone)
    assert head and all(types.get(n.output[0]) == onnx.TensorProto.FLOAT for n in head)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 13 and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in matmuls)
    assert types["probabilities"] == types["logits"] == types["weight_map"] == onnx.TensorProto.FLOAT


def test_instances_and_threads_flags_reach_the_config(tiny_checkpoint, tmp_path):
    args = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path)]
    assert export_main([*args, "--instances", "2", "--intra-op-threads", "4"]) == 0
    raw = parse_pbtxt((tmp_path / "threegnet" / "config.pbtxt").read_text())
    assert raw.instance_group[0].count == 2 and raw.parameters["intra_op_thread_count"].string_value == "4"
    assert raw.parameters["session.intra_op.allow_spinning"].string_value == "0"  # the default: off
    assert export_main([*args, "--allow-spinning", "--force"]) == 0
    raw = parse_pbtxt((tmp_path / "threegnet" / "config.pbtxt").read_text())
    assert raw.parameters["session.intra_op.allow_spinning"].string_value == "1"
    for flag in ("--instances", "--preprocess-instances"):
        result = run_export(*args, flag, "0")
        assert result.returncode == 2 and "--instances and --preprocess-instances must be >= 1" in result.stderr


def test_tensorrt_flag_adds_the_fp16_accelerator(tiny_checkpoint, tmp_path):
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path), "--tensorrt-fp16"]) == 0
    cfg = parse_pbtxt((tmp_path / "threegnet" / "config.pbtxt").read_text())
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"


def test_released_places365_checkpoint_gets_places365_labels(tmp_path):
    ckpt = tmp_path / "ResNet18-3G-Places365.pth.tar"
    released_checkpoint(ckpt, "resnet18_3g", 365)
    assert export_main(["--checkpoint", str(ckpt), "--output-dir", str(tmp_path / "repo")]) == 0
    labels = (tmp_path / "repo" / "threegnet" / "labels.txt").read_text().splitlines()
    assert len(labels) == 365 and labels[0] == "airfield" and labels[-1] == "zen_garden"


@pytest.mark.slow
def test_released_resnet50_3g_exports_and_reproduces_pytorch(tmp_path):
    """The done-means of the export issue: the authors' format at full size, ImageNet labels."""
    ckpt = tmp_path / "ResNet50-3G-ImageNet.pth.tar"
    ref = ServingModel(released_checkpoint(ckpt, "resnet50_3g", 1000), load_model(ckpt).preprocessing).eval()
    repo = tmp_path / "repo"
    result = run_export("--checkpoint", str(ckpt), "--output-dir", str(repo))
    assert result.returncode == 0, result.stderr
    assert "resnet50_3g, 1000 classes (released checkpoint); labels from ImageNet-1K" in result.stderr
    labels = (repo / "threegnet" / "labels.txt").read_text().splitlines()
    assert labels[0] == "tench" and len(labels) == 1000
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(repo / "threegnet" / "1" / "model.onnx"))
    _, logits, wmap = sess.run(None, {"image": x})
    with torch.no_grad():
        _, ref_logits, ref_wmap = ref(torch.from_numpy(x))
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-3, atol=1e-3)
    assert wmap.shape == (2, 14, 14)
    np.testing.assert_allclose(wmap, ref_wmap.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["../escaped", "", ".", "..", "a/b", "/abs", ".hidden", "sp ace"])
def test_name_must_be_a_model_name_inside_the_repository(tiny_checkpoint, tmp_path, capsys, name):
    repo = tmp_path / "place" / "repo"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo), "--name", name]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --name ")
    assert snapshot(tmp_path) == {}  # nothing written, in the repository or beside it


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stripes\nchecks\nstripes\nblobs\n", "duplicate labels: 'stripes' (lines 1, 3)"),
        ("stripes\n\nchecks\nblobs\nnoise\n", "blank line 2: one label per line"),
        ("\nstripes\nchecks\n \nblobs\n", "blank lines 1, 4: one label per line"),
    ],
)
def test_labels_with_duplicates_or_blank_lines_are_refused(tiny_checkpoint, tmp_path, capsys, text, message):
    labels = tmp_path / "labels.txt"
    labels.write_text(text)
    args = ["--checkpoint", str(tiny_checkpoint), "--output-dir", str(tmp_path / "r"), "--labels", str(labels)]
    assert export_main(args) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line == f"error: {labels}: {message}" or line.startswith(f"error: {labels}: {message}"), line
    assert not (tmp_path / "r" / "threegnet").exists()


def test_blank_lines_at_the_end_of_a_labels_file_are_fine(tiny_checkpoint, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("w\nx\ny\nz\n\n\n")
    repo = tmp_path / "r"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--output-dir", str(repo), "--labels", str(labels)]) == 0
    assert (repo / "threegnet" / "labels.txt").read_text() == "w\nx\ny\nz\n"


def test_the_recorded_validation_accuracy_travels_into_the_config():
    """``predict.py --evaluate`` prints it beside what the served model scores."""
    from export.to_onnx import recorded_accuracy

    ours = {"metrics": {"val_top1": 87.5, "val_top5": 99.0, "epoch": 14, "train_loss": 0.3}}
    assert recorded_accuracy(ours) == {"val_top1": 87.5, "val_top5": 99.0, "epoch": 14.0}
    assert recorded_accuracy({"best_prec1": 78.66, "state_dict": {}}) == {"val_top1": 78.66}  # a released one
    assert recorded_accuracy({"state_dict": {}}) == {}
