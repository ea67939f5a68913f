"""Triton python-backend model: encoded image bytes to the ONNX model's uint8 input.

The exporter copies this file into the model repository as ``model.py``, beside a
copy of ``threegnet_preprocessing.py`` (as ``threegnet_preprocessing.py``), so the
server decodes, orients, resizes and crops exactly as training evaluated. Each
request gets its own answer: a bad image fails its request with a one-line message
that names the problem (never a traceback or a server path), and the other requests
of the batch go on. An exception escaping ``execute`` would fail the whole batch.

Each rejected request adds one to the counter ``threegnet_preprocess_rejected_total`` on
Triton's own metrics endpoint, labelled by ``model`` and by ``reason`` (the first bad
image's :attr:`ImageError.reason`, a fixed set, plus ``out_of_memory``): operators see what
uploads fail, and why, without reading logs.
"""

import json
import os
import sys
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from threegnet_preprocessing import REJECT_REASONS, ImageError, Preprocessing, load_and_preprocess

INPUT, OUTPUT = "image_bytes", "image"
REJECTED_METRIC = "threegnet_preprocess_rejected_total"
OUT_OF_MEMORY = "out_of_memory"  # the server's trouble rather than the image's, but a refused upload all the same


def _log_unexpected(what: str) -> None:
    """The full traceback goes to the server's log, for operators; the client gets one line."""
    try:
        pb_utils.Logger.log_error(f"{what}: {traceback.format_exc()}")
    except Exception:  # an old stub without the logger: stderr reaches Triton's log too
        print(f"{what}: {traceback.format_exc()}", file=sys.stderr, flush=True)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.preprocessing = Preprocessing.from_dict(json.loads(config["parameters"]["preprocessing"]["string_value"]))
        self._family, self._rejected = None, {}
        family_type = getattr(pb_utils, "MetricFamily", None)
        if family_type is None:  # a stub without custom metrics: serve without the counter
            return
        # Every reason's series exists from the start (at 0), so a rate over it is defined before the
        # first rejection. Instances of one model share the series: Triton registers a family once.
        self._family = family_type(
            name=REJECTED_METRIC,
            description="Uploads the preprocessing model refused, by reason (one per rejected request)",
            kind=family_type.COUNTER,
        )
        model = args.get("model_name", config.get("name", ""))
        self._rejected = {
            reason: self._family.Metric(labels={"model": model, "reason": reason})
            for reason in (*REJECT_REASONS, OUT_OF_MEMORY)
        }

    def finalize(self):
        # Triton wants a family's metrics released before the family itself.
        self._rejected.clear()
        self._family = None

    def _count_rejected(self, reason: str) -> None:
        metric = self._rejected.get(reason) or self._rejected.get("other")
        if metric is None:
            return
        try:
            metric.increment(1)
        except Exception:  # a metric must never cost a request its answer
            _log_unexpected("cannot count a rejected upload")

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        """One request's response, whatever its bytes do to the decoders."""
        try:
            items = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy().reshape(-1)
            images = [self._preprocess(item, i, len(items)) for i, item in enumerate(items)]
            return pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, np.stack(images))])
        except ImageError as e:
            message, code, reason = str(e), pb_utils.TritonError.INVALID_ARG, e.reason
        except MemoryError:
            _log_unexpected("out of memory preprocessing a request")
            message, code = "the server ran out of memory decoding this image", pb_utils.TritonError.UNAVAILABLE
            reason = OUT_OF_MEMORY
        except Exception as e:
            _log_unexpected("unexpected error preprocessing a request")
            message = f"the image could not be preprocessed ({type(e).__name__})"
            code, reason = pb_utils.TritonError.INTERNAL, "other"
        self._count_rejected(reason)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _preprocess(self, item, index, count):
        try:
            data = item if isinstance(item, bytes) else bytes(item)
            return load_and_preprocess(data, self.preprocessing)
        except ImageError as e:
            raise ImageError(f"{self._where(index, count)}{e}", reason=e.reason) from None
        except MemoryError:
            raise
        except Exception as e:  # resize or crop failing on what the decoder let through
            _log_unexpected(f"unexpected error preprocessing {self._where(index, count) or 'an image'}")
            raise ImageError(
                f"{self._where(index, count)}the image could not be preprocessed ({type(e).__name__})"
            ) from None

    @staticmethod
    def _where(index, count):
        return f"image {index + 1} of {count}: " if count > 1 else ""
