"""The preprocessing model counts the uploads it refuses, by reason, on Triton's own metrics endpoint."""

from __future__ import annotations

import io
import re
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from client.inference import RequestFailed, TritonClassifier
from threegnet_preprocessing import REJECT_REASONS, ImageError, load_and_preprocess

METRIC = "threegnet_preprocess_rejected_total"
SAMPLE = re.compile(rf"^{METRIC}\{{(?P<labels>[^}}]*)\}} (?P<value>\S+)$", re.MULTILINE)


def rejected(metrics_url: str) -> dict[tuple[str, str], float]:
    """(model, reason) -> count, from one scrape."""
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    counts = {}
    for sample in SAMPLE.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', sample["labels"]))
        counts[labels["model"], labels["reason"]] = float(sample["value"])
    return counts


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"plain text, not an image", "not_an_image"),
        (png(120, 90)[:400], "corrupt"),
        (png(4, 4), "too_small"),
        (png(8, 400), "aspect_ratio"),
    ],
)
def test_image_errors_say_why_in_a_word(data, reason):
    with pytest.raises(ImageError) as refused:
        load_and_preprocess(data)
    assert refused.value.reason == reason and reason in REJECT_REASONS
    assert str(refused.value)  # the message for people is still there


def test_rejected_uploads_are_counted_by_reason(triton):
    classifier = TritonClassifier(triton.grpc_url, "grpc", retries=0)
    assert classifier.describe().image_model is not None
    before = rejected(triton.metrics_url)
    model = "threegnet_preprocess"
    # Every reason has its series from the start, so rates are defined before the first rejection.
    assert {r for m, r in before if m == model} >= set(REJECT_REASONS)

    corrupt = png(120, 90, seed=1)[:500]  # a PNG cut short: the decoder finds it truncated
    uploads = {"corrupt": [corrupt, corrupt], "too_small": [png(4, 4)], "not_an_image": [b"%PDF-1.7 not a picture"]}
    for blobs in uploads.values():
        for blob in blobs:
            with pytest.raises(RequestFailed):
                classifier.classify_bytes([blob])
    (answer,) = classifier.classify_bytes([png(120, 90, seed=2)])  # a good upload counts nowhere
    assert answer.top_k
    # A request of several images is refused once, for its first bad image.
    with pytest.raises(RequestFailed, match="image 2 of 3"):
        classifier.classify_bytes([png(100, 100), png(5, 300), b"junk"])
    expected = {reason: len(blobs) for reason, blobs in uploads.items()}
    expected["too_small"] += 1

    deadline = time.monotonic() + 10  # the backend reports increments to the server as they happen
    while True:
        after = rejected(triton.metrics_url)
        grown = {r: after[model, r] - before.get((model, r), 0.0) for m, r in after if m == model}
        if all(grown.get(r, 0) == expected.get(r, 0) for r in grown) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {r: n for r, n in grown.items() if n} == expected
