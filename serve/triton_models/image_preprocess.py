"""Triton python-backend model: encoded image bytes to the ONNX model's uint8 input.

The exporter copies this file into the model repository as ``model.py``, beside a
copy of ``threegnet_preprocessing.py`` (as ``threegnet_preprocessing.py``), so the
server decodes, orients, resizes and crops exactly as training evaluated. Each
request gets its own answer: a bad image fails its request with a one-line message
that names the problem (never a traceback or a server path), and the other requests
of the batch go on. An exception escaping ``execute`` would fail the whole batch.
"""

import json
import os
import sys
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from threegnet_preprocessing import ImageError, Preprocessing, load_and_preprocess

INPUT, OUTPUT = "image_bytes", "image"


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

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        """One request's response, whatever its bytes do to the decoders."""
        try:
            items = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy().reshape(-1)
            images = [self._preprocess(item, i, len(items)) for i, item in enumerate(items)]
            return pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, np.stack(images))])
        except ImageError as e:
            message, code = str(e), pb_utils.TritonError.INVALID_ARG
        except MemoryError:
            _log_unexpected("out of memory preprocessing a request")
            message, code = "the server ran out of memory decoding this image", pb_utils.TritonError.UNAVAILABLE
        except Exception as e:
            _log_unexpected("unexpected error preprocessing a request")
            message = f"the image could not be preprocessed ({type(e).__name__})"
            code = pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def _preprocess(self, item, index, count):
        try:
            data = item if isinstance(item, bytes) else bytes(item)
            return load_and_preprocess(data, self.preprocessing)
        except ImageError as e:
            raise ImageError(f"{self._where(index, count)}{e}") from None
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
