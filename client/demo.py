"""The Gradio demo: upload an image and see what a 3G-Net model served by Triton makes of it.

    python client/demo.py                          # Triton gRPC on 127.0.0.1:8001, page on 127.0.0.1:7860
    python client/demo.py --url 127.0.0.1:8000 --protocol http --port 7861 --examples data/demo/val

The page shows the top-5 classes, the round-trip latency, the served model's name
and version, a server health line and, as a heat map over the crop the model saw,
the weights of the last re-weighting stage. The upload goes to the server as
encoded bytes (the server decodes and preprocesses). Errors show as messages on
the page. The page binds 127.0.0.1; a public link only with --share.
"""

from __future__ import annotations

import os

# Before gradio is imported: no telemetry and no version check, nothing leaves this machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from client.heatmap import is_flat, overlay
from client.inference import (
    DEFAULT_MODEL,
    PROTOCOLS,
    ClientError,
    ModelInfo,
    TritonClassifier,
    add_connection_args,
    connection_from_args,
)
from threegnet_preprocessing import IMAGE_SUFFIXES, ImageError, load_and_preprocess

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXAMPLES = ROOT / "data" / "demo" / "val"
MAX_EXAMPLES = 12
TOP_K = 5
DISPLAY_SIZE = 320  # the overlay is enlarged to at least this many pixels
MAX_UPLOAD = "25mb"  # the server refuses images over 8192 x 8192 pixels anyway


def find_examples(folder: Path | None, limit: int = MAX_EXAMPLES) -> list[Path]:
    """Up to ``limit`` images under ``folder``, taken in turn from each sub-folder (class),
    so that every class has an example; none if the folder does not exist."""
    if folder is None or not folder.is_dir():
        return []
    by_folder: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            by_folder.setdefault(path.parent, []).append(path)
    interleaved = chain.from_iterable(zip_longest(*by_folder.values()))
    return [p for p in interleaved if p is not None][:limit]


class Demo:
    """The page's callbacks; errors become messages, never stack traces."""

    def __init__(self, classifier: TritonClassifier) -> None:
        self.classifier = classifier

    def health(self) -> str:
        """One Markdown line: is the server up, and what does it serve."""
        h = self.classifier.health()
        if h.error:
            return f"**Server unreachable.** {h.error}"
        state = "live and ready" if h.ready else ("live, not ready" if h.live else "not live")
        server = f"Triton {h.version} at {self.classifier.where} is {state}"
        try:
            info = self.classifier.describe(refresh=True)
        except ClientError as e:
            return f"**Model problem.** {server}, but {e}"
        via = f", images through `{info.image_model}`" if info.image_model else ""
        return f"**Server OK.** {server}; serving **{info.summary()}**{via}."

    def classify(
        self, upload: dict[str, Any] | None, show_map: bool
    ) -> tuple[dict[str, float] | None, Image.Image | None, str]:
        """Top-5 for the label, the weight-map overlay (or nothing), and a Markdown line.

        ``upload`` is the image component's raw file record (Gradio's preprocessing is off):
        Gradio would otherwise try to decode the upload itself and fail on a bad file with
        its own message; the server's is clearer.
        """
        if not upload:
            return None, None, ""
        try:
            data = Path(upload["path"]).read_bytes()
            info = self.classifier.describe()
            started = time.perf_counter()
            result = self.classifier.classify_bytes([data], top_k=TOP_K, weight_map=show_map)[0]
            latency_ms = 1000 * (time.perf_counter() - started)
        except (ClientError, OSError) as e:
            message = str(e) if isinstance(e, ClientError) else f"cannot read the upload: {e}"
            gr.Warning(message)
            return None, None, f"**Error:** {message}"
        protocol = "gRPC" if self.classifier.protocol == "grpc" else "HTTP"
        details = f"Model **{info.name}** v{info.version} · latency **{latency_ms:.0f} ms** (round trip, {protocol})"
        picture = None
        if show_map and result.weight_map is not None:
            picture, note = self._overlay(data, info, result.weight_map)
            details += f" · {note}"
        elif show_map:
            details += " · this model has no re-weighting map"
        return {p.label: p.probability for p in result.top_k}, picture, details

    @staticmethod
    def _overlay(data: bytes, info: ModelInfo, weights: np.ndarray) -> tuple[Image.Image | None, str]:
        """The weight map over the crop the model saw, made here from the model's preprocessing record; a
        server that keeps its configs private (locked) gets the map alone, over grey."""
        h, w = weights.shape
        spread = "flat: no region preferred" if is_flat(weights) else "dark to bright"
        note = f"re-weighting map {h}x{w}, weights {weights.min():.3f} to {weights.max():.3f} ({spread})"
        crop = np.full((info.input_size, info.input_size, 3), 128, dtype=np.uint8)
        if info.preprocessing is None:
            note += "; the server keeps its preprocessing private: the map alone"
        else:
            try:
                crop = load_and_preprocess(data, info.preprocessing)
            except ImageError:  # the server decoded it; a local decoder without that codec may not
                return None, note
        scale = max(1, -(-DISPLAY_SIZE // crop.shape[0]))  # whole pixels: the crop as the model saw it
        picture = overlay(crop, weights)
        return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST), note


def build_app(classifier: TritonClassifier, examples: Sequence[Path] = ()) -> gr.Blocks:
    demo = Demo(classifier)
    with gr.Blocks(title="3G-Net on Triton", analytics_enabled=False) as app:
        gr.Markdown(
            "# 3G-Net image classifier\n"
            "Upload an image or pick an example: it goes to Triton as encoded bytes, and the server decodes, "
            "resizes, crops and classifies it."
        )
        with gr.Row(equal_height=True):
            health = gr.Markdown(elem_id="health")
            refresh = gr.Button("Check the server again", size="sm", scale=0, min_width=180)
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath", sources=["upload", "clipboard"], label="Image", height=360, elem_id="input-image"
                )
                show_map = gr.Checkbox(value=True, label="Show the re-weighting map")
                gallery = (
                    gr.Examples(
                        examples=[[str(p)] for p in examples],
                        inputs=[image],
                        examples_per_page=MAX_EXAMPLES,
                        elem_id="examples",
                    )
                    if examples
                    else None
                )
            with gr.Column():
                label = gr.Label(num_top_classes=TOP_K, label=f"Top-{TOP_K} classes", elem_id="top-classes")
                details = gr.Markdown(elem_id="details")
                weight_map = gr.Image(
                    type="pil",
                    format="png",
                    interactive=False,
                    height=360,
                    label="Re-weighting map of the last stage, over the model's crop",
                    elem_id="weight-map",
                )
                gr.Markdown(
                    "Brighter regions count more in the generalized-Gaussian covariance. The colours span this "
                    "image's own lowest to highest weight: only relative weights matter, as the covariance is "
                    "normalized by its trace."
                )
        app.load(demo.health, None, health, api_name=False)
        refresh.click(demo.health, None, health, api_name="health")
        # upload, not change: Gradio fires change twice when an image replaces another.
        run = {"fn": demo.classify, "inputs": [image, show_map], "outputs": [label, weight_map, details]}
        gr.on([image.upload, show_map.change], **run, api_name="classify", preprocess=False)
        if gallery is not None:
            gallery.load_input_event.then(**run, api_name=False, preprocess=False)
        image.clear(lambda: (None, None, ""), None, run["outputs"], api_name=False)
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="Triton HOST:PORT (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="default: grpc")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    p.add_argument("--port", type=int, default=7860, help="the page's port on 127.0.0.1 (default 7860)")
    p.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    p.add_argument(
        "--examples", type=Path, help=f"folder of example images (default {DEFAULT_EXAMPLES.relative_to(ROOT)})"
    )
    p.add_argument("--concurrency", type=int, default=2, help="requests to Triton at once (default 2)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Triton (default 30)")
    p.add_argument(
        "--resize",
        type=int,
        help="for the weight map over the crop, when the server keeps its preprocessing record private: "
        "the shorter side before the centre crop",
    )
    add_connection_args(p)
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.timeout <= 0:
        p.error("--concurrency must be >= 1 and --timeout > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.examples is not None and not args.examples.is_dir():
        print(f"error: --examples {args.examples}: no such folder", file=sys.stderr)
        return 2
    folder = args.examples or DEFAULT_EXAMPLES
    examples = find_examples(folder)
    try:
        connection = connection_from_args(args)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classifier = TritonClassifier(
        args.url, args.protocol, args.model, timeout=args.timeout, resize=args.resize, **connection
    )
    print(f"demo backed by Triton at {classifier.where}, {len(examples)} example image(s)", file=sys.stderr)
    if args.share:
        print("--share: the page will be reachable by anyone with the link", file=sys.stderr)
    # Ctrl-C, `kill -INT` (even in a background job, which starts with SIGINT ignored), SIGTERM and SIGHUP
    # all close the server the same way: as a KeyboardInterrupt in Gradio's main loop.
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, signal.default_int_handler)
    app = build_app(classifier, examples)
    app.queue(default_concurrency_limit=args.concurrency, max_size=64)
    app.launch(
        server_name="127.0.0.1",
        server_port=args.port,
        share=args.share,
        show_error=True,  # an upload Gradio cannot open shows its reason, not "Error"
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(folder.resolve())] if examples else None,
        ssr_mode=False,
        mcp_server=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
