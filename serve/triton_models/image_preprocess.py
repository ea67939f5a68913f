"""Triton python-backend model: encoded image bytes to the ONNX model's uint8 input.

The exporter copies this file into the model repository as ``model.py``, beside a
copy of ``threegnet_preprocessing.py`` (as ``threegnet_preprocessing.py``), so the
server decodes, orients, resizes and crops exactly as training evaluated. Each
request gets its own answer: a bad image fails its request with a message that
names the problem, and the other requests of the batch go on.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from threegnet_preprocessing import ImageError, Preprocessing, load_and_preprocess

INPUT, OUTPUT = "image_bytes", "image"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.preprocessing = Preprocessing.from_dict(json.loads(config["parameters"]["preprocessing"]["string_value"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                items = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy().reshape(-1)
                images = [self._preprocess(item, i, len(items)) for i, item in enumerate(items)]
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, np.stack(images))]))
            except ImageError as e:
                error = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses

    def _preprocess(self, item, index, count):
        try:
            data = item if isinstance(item, bytes) else bytes(item)
            return load_and_preprocess(data, self.preprocessing)
        except ImageError as e:
            where = f"image {index + 1} of {count}: " if count > 1 else ""
            raise ImageError(f"{where}{e}") from None
