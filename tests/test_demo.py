"""``python client/demo.py`` against the real Triton server: through ``gradio_client`` and in a real browser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import ROOT, TINY_CLASSES, TINY_PREPROCESSING
from photos import photos
from PIL import Image

from serve.children import NotAnswering, wait_http_ok
from serve.server import free_port
from threegnet_preprocessing import Preprocessing, load_and_preprocess

DEMO = ROOT / "client" / "demo.py"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def write_image(path: Path, seed: int, size: tuple[int, int] = (80, 100)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    pixels[:, :: 2 + seed % 4] = rng.integers(0, 256, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """A val-style folder: two class folders of two images each."""
    folder = tmp_path_factory.mktemp("examples")
    for i, name in enumerate(["checks/a.png", "checks/b.png", "stripes/c.png", "stripes/d.jpg"]):
        write_image(folder / name, seed=10 + i)
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("upload") / "upload.png", seed=3, size=(90, 130))


@pytest.fixture(scope="module")
def demo_url(triton, examples, tmp_path_factory):
    """The demo, started as a user starts it, on a free port; its log is kept for failures."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(DEMO), "--url", triton.grpc_url, "--port", str(port), "--examples", str(examples)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        try:
            wait_http_ok(url, process, timeout=90, poll=0.3)
        except NotAnswering as e:
            pytest.fail(f"the demo {e}:\n{log.read_text()}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def expected(model_repository, image) -> np.ndarray:
    session = ort.InferenceSession(str(model_repository / "threegnet" / "1" / "model.onnx"))
    batch = load_and_preprocess(image, Preprocessing(**TINY_PREPROCESSING))[None]
    return session.run(["probabilities"], {"image": batch})[0][0]


@pytest.fixture(scope="module")
def api(demo_url):
    from gradio_client import Client

    return Client(demo_url, verbose=False)


def test_upload_returns_the_top_classes_latency_model_and_weight_map(api, image, expected):
    from gradio_client import handle_file

    label, weight_map, details = api.predict(handle_file(str(image)), True, api_name="/classify")
    confidences = label["confidences"]
    assert len(confidences) == min(5, len(TINY_CLASSES))
    assert [c["confidence"] for c in confidences] == sorted((c["confidence"] for c in confidences), reverse=True)
    for c in confidences:
        assert c["confidence"] == pytest.approx(float(expected[TINY_CLASSES.index(c["label"])]), abs=2e-6)
    assert label["label"] == TINY_CLASSES[int(np.argmax(expected))]
    assert re.search(r"Model \*\*threegnet\*\* v1 · latency \*\*\d+ ms\*\*", details), details
    assert "re-weighting map 4x4" in details
    with Image.open(weight_map) as overlay:  # the 64x64 crop, enlarged in whole pixels
        assert overlay.size[0] == overlay.size[1] and overlay.size[0] % 64 == 0


def test_without_the_map_no_overlay_is_made(api, image):
    from gradio_client import handle_file

    label, weight_map, details = api.predict(handle_file(str(image)), False, api_name="/classify")
    assert len(label["confidences"]) == 4 and weight_map is None and "re-weighting" not in details


def test_a_bad_file_is_a_message_on_the_page(api, image, tmp_path):
    from gradio_client import handle_file

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image.read_bytes()[:300])
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    for path, reason in ((truncated, "corrupt or truncated image"), (text, "not an image")):
        label, weight_map, details = api.predict(handle_file(str(path)), True, api_name="/classify")
        assert details.startswith("**Error:**") and reason in details, details
        assert weight_map is None and not label.get("confidences")


def test_health_line_names_the_server_and_the_model(api, triton):
    health = api.predict(api_name="/health")
    assert health.startswith("**Server OK.**") and triton.grpc_url in health
    # A locked server keeps the architecture and precision (in the config) to its operators.
    assert "threegnet v1 (4 classes)" in health and "threegnet_image" in health


def test_server_down_is_a_message_not_a_traceback(image):
    """The page's callbacks with nothing listening at the URL (in-process: no second app needed)."""
    from client.demo import Demo
    from client.inference import TritonClassifier

    url = f"127.0.0.1:{free_port()}"
    demo = Demo(TritonClassifier(url, retries=0))
    assert demo.health().startswith("**Server unreachable.** cannot reach Triton at " + url)
    with pytest.warns(UserWarning, match="cannot reach Triton"):  # gr.Warning, outside a page: a warning
        label, weight_map, details = demo.classify({"path": str(image)}, True)
    assert label is None and weight_map is None
    assert details.startswith("**Error:** cannot reach Triton at " + url)


def test_examples_cover_every_class_folder(examples):
    from client.demo import find_examples

    found = find_examples(examples, limit=3)
    assert [p.relative_to(examples).as_posix() for p in found] == ["checks/a.png", "stripes/c.png", "checks/b.png"]
    assert find_examples(examples / "missing") == [] and find_examples(None) == []


@pytest.mark.slow
def test_in_a_browser_upload_shows_the_top_classes(demo_url, image, expected, artifacts_dir):
    """Chromium (Debian's, headless) opens the page, uploads an image and sees the label; a screenshot is kept."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: run make browser")
    from playwright.sync_api import expect, sync_playwright

    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(demo_url)
            expect(page.locator("#health")).to_contain_text("Server OK", timeout=30_000)
            details, top = page.locator("#details"), page.locator("#top-classes [data-testid=label-output-value]")
            page.locator("#examples button").first.click()  # an example: checks/a.png
            expect(details).to_contain_text("latency", timeout=30_000)
            expect(top).to_have_text(re.compile("|".join(TINY_CLASSES)))
            page.get_by_role("button", name="Remove Image").click()
            expect(details).to_be_empty()
            page.locator("#input-image input[type=file]").set_input_files(str(image))
            expect(details).to_contain_text("latency", timeout=30_000)
            expect(top).to_have_text(TINY_CLASSES[int(np.argmax(expected))])
            for name in TINY_CLASSES:
                expect(page.locator(f"#top-classes [data-testid={name}-confidence-set]")).to_be_visible()
            expect(page.locator("#weight-map img")).to_be_visible()
            for output in ("#top-classes", "#weight-map"):  # the loading veil gone before the screenshot
                expect(page.locator(f"{output} [data-testid=status-tracker]")).to_have_class(re.compile(r"\bhide\b"))
            page.wait_for_timeout(500)  # Gradio fades new values in
            page.screenshot(path=str(artifacts_dir / "demo_upload.png"), full_page=True)
        finally:
            browser.close()
    outside = sorted({url for url in requested if not url.startswith(demo_url)})
    assert not outside, f"the page reached beyond the demo: {outside}"


def test_the_files_people_upload_are_classified(api, model_repository, tmp_path):
    """Each kind of file of tests/photos.py uploaded to the page: the top classes come back, as the
    exported model scores the shared decoder's crop, and the weight map is drawn (decoded here too)."""
    from gradio_client import handle_file

    session = ort.InferenceSession(str(model_repository / "threegnet" / "1" / "model.onnx"))
    pp = Preprocessing(**TINY_PREPROCESSING)
    for photo in photos():
        path = tmp_path / f"{photo.name}{photo.suffix}"
        path.write_bytes(photo.data)
        expected = session.run(["probabilities"], {"image": load_and_preprocess(path, pp)[None]})[0][0]
        label, weight_map, details = api.predict(handle_file(str(path)), True, api_name="/classify")
        assert label["label"] == TINY_CLASSES[int(np.argmax(expected))], (photo.name, details)
        top = label["confidences"][0]
        assert top["confidence"] == pytest.approx(float(expected.max()), abs=2e-6), photo.name
        assert weight_map is not None, (photo.name, details)
