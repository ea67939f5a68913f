"""Classify image files with a 3G-Net model served by Triton Inference Server.

    python client/predict.py photo.jpg holiday/ 'scans/**/*.png'
    python client/predict.py data/demo/val --json --top-k 3
    python client/predict.py img.png --protocol http --url 127.0.0.1:8000 --send tensor --resize 256
    python client/predict.py img.png --url triton.example.com:443 --ca ca.pem     # gRPC over TLS

Files, folders (recursive, image suffixes only) and quoted globs. By default the
encoded files go to the server's image-bytes ensemble, which decodes and
preprocesses them; --send tensor preprocesses here and calls the raw model (a
locked server keeps the model's preprocessing record private: give --resize, the
shorter side before the centre crop; the crop comes from the model's input). --json prints one JSON object per
input on stdout: {"path", "top_k": [{"index", "label", "probability"}...]} or
{"path", "error"}. Folders and ``**`` globs follow symbolic links to folders,
entering each folder once; what they leave out (a symlink loop, a broken link) is
said on stderr.

--evaluate DIR: accuracy through the server on an ImageFolder (DIR/<class>/<images>, class
folders named as the model's labels): top-1 and top-5 for the bytes path and, with the
preprocessing record or --resize, the tensor path, beside the checkpoint's recorded
validation accuracy when the server shows it.

Exit status:
  0    every input classified
  1    some input missing, unreadable or not an image, or refused by an overloaded
       server after the retries (the others are still classified)
  2    server unreachable, not speaking --protocol at --url (the other port?), model
       missing or not ready (also when either goes away during the run), a key the
       server wants and did not get (--inference-key-file), or bad arguments (a --url
       with a scheme other than the protocol's, --send tensor without --resize on a
       locked server, an --evaluate class folder that names no label of the model)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from client.evaluate import (
    TOP_K,
    Evaluation,
    FolderMismatch,
    Score,
    class_folders,
    load_dataset,
    recorded_accuracy,
    server_labels,
)
from client.image_files import collect
from client.inference import (
    DEFAULT_MODEL,
    PROTOCOLS,
    ClientError,
    ModelInfo,
    ModelUnavailable,
    Prediction,
    RequestFailed,
    ServerOverloaded,
    ServerUnreachable,
    TritonClassifier,
    add_connection_args,
    connection_from_args,
)
from threegnet_preprocessing import ImageError, Preprocessing, load_and_preprocess

EXIT_OK, EXIT_INPUT_ERRORS, EXIT_SERVER = 0, 1, 2
PROGRESS_MIN = 5  # fewer images than this need no progress bar


@dataclass(frozen=True)
class Outcome:
    """What happened to one input: its top-k, or why it has none."""

    path: str
    top_k: list[Prediction] | None = None
    error: str | None = None

    def to_json(self) -> str:
        if self.error is not None:
            return json.dumps({"path": self.path, "error": self.error})
        return json.dumps({"path": self.path, "top_k": [p.to_dict() for p in self.top_k or []]})


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    description, epilog = __doc__.split("\nExit status:", 1)
    p = argparse.ArgumentParser(
        description=description, epilog="exit status:" + epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (recursive) or quoted globs")
    p.add_argument(
        "--url",
        help="server HOST:PORT (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http); "
        "http://HOST:PORT means --protocol http, grpc://HOST:PORT --protocol grpc",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, help="default: grpc, or the scheme of --url")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"the tensor model or its bytes ensemble (default {DEFAULT_MODEL})"
    )
    p.add_argument("--top-k", type=_at_least(1), default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per input on stdout")
    p.add_argument(
        "--send", choices=("bytes", "tensor"), default="bytes", help="encoded files (default) or local crops"
    )
    p.add_argument("--batch-size", type=_at_least(1), default=8, help="images per request (default 8)")
    p.add_argument(
        "--resize",
        type=_at_least(1),
        help="--send tensor on a server that keeps its configs private: the shorter side before the centre crop "
        "(the crop comes from the model's input; default: the model's preprocessing record)",
    )
    p.add_argument("--concurrency", type=_at_least(1), default=4, help="requests in flight (default 4)")
    p.add_argument("--timeout", type=_seconds, default=60.0, help="seconds to wait for one answer (default 60)")
    p.add_argument(
        "--retries",
        type=_at_least(0),
        default=3,
        help="retries on connection errors and overload refusals, with backoff and jitter (default 3)",
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="PATH is an ImageFolder (DIR/<class>/<images>): print top-1 and top-5 through the server",
    )
    add_connection_args(p)
    return p.parse_args(argv)


class UsageError(ValueError):
    """Arguments that contradict each other (found after parsing)."""


def resolve_url(url: str | None, protocol: str | None) -> tuple[str | None, str]:
    """``--url`` as the HOST:PORT the client libraries take, and the protocol. A scheme that names a
    protocol (``http://``, ``grpc://``) is stripped and chooses it; one that contradicts ``--protocol``,
    or any other scheme or a path after the port, is a :class:`UsageError`."""
    if url is None or "://" not in url:
        if url is not None and "/" in url:
            raise UsageError(f"--url {url}: give HOST:PORT, without a path")
        return url, protocol or "grpc"
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in PROTOCOLS:
        tls = "; for TLS add --tls or --ca PEM" if scheme in ("https", "grpcs") else ""
        raise UsageError(
            f"--url {url}: unsupported scheme '{scheme}://'; give HOST:PORT with --protocol grpc|http{tls}"
        )
    if protocol is not None and scheme != protocol:
        raise UsageError(f"--url {url} is an {scheme} address but --protocol is {protocol}")
    host_port = rest.rstrip("/")
    if not host_port or "/" in host_port:
        raise UsageError(f"--url {url}: give {scheme}://HOST:PORT, without a path")
    return host_port, scheme


def _load(path: Path, pp: Preprocessing | None) -> bytes | np.ndarray:
    """The file's bytes, or its preprocessed crop when ``pp`` is given."""
    return path.read_bytes() if pp is None else load_and_preprocess(path, pp)


def _classify(classifier: TritonClassifier, items: list[tuple[str, bytes | np.ndarray]], top_k: int) -> list[Outcome]:
    """One request for ``items``; if the server rejects it, each item alone, so that one
    bad image costs only its own answer. A request still refused for overload after the
    client's retries fails its items (sending them one by one would only add load)."""
    payloads = [data for _, data in items]
    try:
        if isinstance(payloads[0], bytes):
            answers = classifier.classify_bytes(payloads, top_k)  # type: ignore[arg-type]
        else:
            answers = classifier.classify_tensors(np.stack(payloads), top_k)
    except ServerOverloaded as e:
        return [Outcome(path, error=str(e)) for path, _ in items]
    except RequestFailed as e:
        if len(items) == 1:
            return [Outcome(items[0][0], error=str(e))]
        return [outcome for item in items for outcome in _classify(classifier, [item], top_k)]
    return [Outcome(path, top_k=a.top_k) for (path, _), a in zip(items, answers, strict=True)]


def classify_files(
    classifier: TritonClassifier, paths: list[Path], top_k: int, pp: Preprocessing | None
) -> list[Outcome]:
    """Read (and with ``pp`` preprocess) ``paths`` and classify the readable ones; in order."""
    failed: dict[str, Outcome] = {}
    items: list[tuple[str, bytes | np.ndarray]] = []
    for path in paths:
        try:
            items.append((str(path), _load(path, pp)))
        except ImageError as e:
            failed[str(path)] = Outcome(str(path), error=str(e))
        except OSError as e:
            failed[str(path)] = Outcome(str(path), error=f"cannot read: {e.strerror or e}")
    done = {o.path: o for o in _classify(classifier, items, top_k)} if items else {}
    return [failed.get(str(p)) or done[str(p)] for p in paths]


def _emit(line: str, stream: TextIO) -> None:
    tqdm.write(line, file=stream)
    stream.flush()


def _human(outcome: Outcome, width: int) -> str:
    classes = "   ".join(f"{p.label} {p.probability:.1%}" for p in outcome.top_k or [])
    return f"{outcome.path:<{width}}  {classes}"


def report(outcome: Outcome, as_json: bool, width: int) -> None:
    if as_json:
        _emit(outcome.to_json(), sys.stdout)
    elif outcome.error is not None:
        _emit(f"{outcome.path}: error: {outcome.error}", sys.stderr)
    else:
        _emit(_human(outcome, width), sys.stdout)


def connect(args: argparse.Namespace, url: str | None, protocol: str) -> tuple[TritonClassifier, ModelInfo]:
    """The classifier for the flags, and the model it finds on the server."""
    classifier = TritonClassifier(
        url, protocol, args.model, timeout=args.timeout, retries=args.retries, resize=args.resize,
        **connection_from_args(args),
    )  # fmt: skip
    names = {"grpc": "gRPC", "http": "HTTP"}
    other = next(p for p in PROTOCOLS if p != protocol)
    swapped = f"is it the {names[other]} port? (--protocol {other})"
    try:
        return classifier, classifier.describe()
    except ServerUnreachable:
        # A front in front of Triton (HAProxy) closes a connection in the other protocol without an answer:
        # ask that protocol at the same address before calling the server unreachable.
        timeout = min(args.timeout, 5)
        probe = TritonClassifier(classifier.url, other, timeout=timeout, retries=0, **connection_from_args(args))
        if not probe.health().live:
            raise
        raise ServerUnreachable(
            f"cannot talk to Triton at {classifier.where}: the answer is not {names[protocol]} (it answers "
            f"{names[other]} there); {swapped}"
        ) from None
    except ClientError:
        raise
    except Exception as e:  # an answer in another protocol: HTTP sent to the gRPC port, or the reverse
        raise ServerUnreachable(
            f"cannot talk to Triton at {classifier.where}: the answer is not {names[protocol]} "
            f"({type(e).__name__}: {str(e) or 'no detail'}); {swapped}"
        ) from None


def classify_all(
    classifier: TritonClassifier, files: list[Path], top_k: int, pp: Preprocessing | None, args: argparse.Namespace
) -> list[Outcome]:
    """Every file, in order, in batches of ``--batch-size`` with ``--concurrency`` requests in flight."""
    batch = min(args.batch_size, classifier.describe().max_batch_size or 1)
    chunks = [files[i : i + batch] for i in range(0, len(files), batch)]
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=len(files) < PROGRESS_MIN or None)
    with bar, ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = [pool.submit(classify_files, classifier, chunk, top_k, pp) for chunk in chunks]
        try:
            for future in futures:
                outcomes += future.result()
                bar.update(len(outcomes) - bar.n)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return outcomes


def evaluate(args: argparse.Namespace) -> int:
    """``--evaluate DIR``: top-1 and top-5 through the server for each wire path it can take."""
    if len(args.paths) != 1:
        raise UsageError("--evaluate takes one folder, an ImageFolder: DIR/<class>/<images>")
    root = Path(args.paths[0])
    class_folders(root)  # a wrong folder is said before the server is asked anything
    url, protocol = resolve_url(args.url, args.protocol)
    classifier, info = connect(args, url, protocol)
    data = load_dataset(root, server_labels(classifier, info))
    for path, why in data.skipped:
        print(f"note: skipped {path}: {why}", file=sys.stderr)
    if not data.files:
        print(f"nothing to evaluate: no images in the class folders of {root}", file=sys.stderr)
        return EXIT_INPUT_ERRORS
    paths: list[tuple[str, str, Preprocessing | None]] = []
    notes = []
    if info.image_model is not None:
        paths.append(("bytes", "server preprocesses", None))
    else:
        notes.append(f"bytes path not evaluated: model '{info.name}' has no image-bytes ensemble ready")
    if info.preprocessing is not None:
        paths.append(("tensor", f"local, resize {info.preprocessing.resize}", info.preprocessing))
    else:
        notes.append(
            "tensor path not evaluated: the server keeps the preprocessing record private; "
            "give --resize N (the shorter side before the centre crop) to evaluate it too"
        )
    if not paths:
        raise ModelUnavailable(f"model '{info.name}': no bytes ensemble and no preprocessing record; give --resize")
    scores = []
    for name, how, pp in paths:
        score = Score(name, how)
        for outcome, truth in zip(classify_all(classifier, data.files, TOP_K, pp, args), data.truth, strict=True):
            if outcome.error is not None:
                print(f"{outcome.path}: error ({name}): {outcome.error}", file=sys.stderr)
            score.add(outcome.top_k if outcome.error is None else None, truth)
        scores.append(score)
    recorded, recorded_note = recorded_accuracy(classifier, info)
    result = Evaluation(
        model=info.summary(), where=classifier.where, images=len(data.files), classes=len(data.classes),
        num_classes=info.num_classes, scores=scores, recorded=recorded, recorded_note=recorded_note, notes=notes,
    )  # fmt: skip
    for line in [result.to_json()] if args.json else result.lines():
        print(line)
    return EXIT_INPUT_ERRORS if any(s.failed for s in scores) else EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.evaluate:
        return evaluate(args)
    url, protocol = resolve_url(args.url, args.protocol)
    inputs = collect(args.paths)
    for path, why in inputs.skipped:
        print(f"note: skipped {path}: {why}", file=sys.stderr)
    for argument, problem in inputs.problems:
        report(Outcome(argument, error=problem), args.json, 0)
    if not inputs.files:
        print(f"nothing to classify: {len(inputs.problems)} path(s) not found", file=sys.stderr)
        return EXIT_INPUT_ERRORS

    classifier, info = connect(args, url, protocol)
    pp = info.preprocessing
    if args.send == "tensor" and pp is None:
        raise ModelUnavailable(
            f"model '{info.name}': the server keeps its preprocessing record private (a locked control plane); "
            "give --resize (the shorter side before the centre crop) or use --send bytes"
        )
    pp = pp if args.send == "tensor" else None

    files = inputs.files
    batch = min(args.batch_size, info.max_batch_size or 1)
    chunks = [files[i : i + batch] for i in range(0, len(files), batch)]
    width = min(max(len(str(f)) for f in files), 60)
    failures, started = 0, time.perf_counter()
    # disable=None: tqdm draws only on a terminal, so logs and pipes get no bar.
    bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=len(files) < PROGRESS_MIN or None)
    with bar, ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures: list[Future[list[Outcome]]] = [
            pool.submit(classify_files, classifier, chunk, args.top_k, pp) for chunk in chunks
        ]
        try:
            for future in futures:
                for outcome in future.result():
                    failures += outcome.error is not None
                    report(outcome, args.json, width)
                    bar.update(1)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    elapsed = time.perf_counter() - started
    classified = len(files) - failures
    missing = f"; {len(inputs.problems)} path(s) not found" if inputs.problems else ""
    print(
        f"classified {classified} of {len(files)} images in {elapsed:.2f} s ({classified / elapsed:.1f} images/s) "
        f"with {info.summary()} at {classifier.where}; {failures} failed{missing}",
        file=sys.stderr,
    )
    return EXIT_INPUT_ERRORS if failures or inputs.problems else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (
        ClientError,
        UsageError,
        FolderMismatch,
    ) as e:  # server unreachable, model missing: nothing can be classified
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SERVER
    except BrokenPipeError:  # the reader went away (| head): stop without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INPUT_ERRORS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
