"""Triton Python model `tokenizer`: TEXT (+ optional ADAPTER_ID) -> INPUT_IDS, ATTENTION_MASK,
ENCODER_ADAPTER_ID. Thin: the work is in loraembed.tokenization."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from loraembed.config import RequestOptions, ServingConfig
from loraembed.engine import ModelSettings
from loraembed.errors import LoraEmbedError, RequestError
from loraembed.tokenization import TextTokenizer
from loraembed.triton_params import NO_PARAMETERS, parameters_from_model_config, request_parameters

assert np.__version__.startswith("1."), f"Triton 2.51's Python stub needs numpy<2, found {np.__version__}"

NO_ADAPTER = np.full((1, 1), b"", dtype=object)  # ENCODER_ADAPTER_ID of one text without ADAPTER_ID (read-only use)


def _error_response(error: Exception, code_name: str = "INVALID_ARG"):
    code = getattr(pb_utils.TritonError, code_name)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error), code))


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        serving = ServingConfig.from_parameters(parameters_from_model_config(model_config))
        settings = ModelSettings.resolve(serving)
        self.default_normalize = settings.default_normalize
        self.hidden_size = settings.encoder_config.hidden_size
        # What a request without parameters gets (most requests): parsed once, as the engine does.
        self.default_truncate = RequestOptions.from_parameters({}, self.default_normalize, self.hidden_size).truncate
        self.tokenizer = TextTokenizer(settings.model_path, settings.max_seq_len, serving.max_text_bytes)

    def _read_request(self, request):
        """(texts, adapter ids [n, 1] bytes, truncate) or a RequestError for this request."""
        inputs = {tensor.name(): tensor for tensor in request.inputs()}  # one call, not one per name
        texts = inputs["TEXT"].as_numpy().reshape(-1)
        parameters = request.parameters()
        truncate = (
            self.default_truncate
            if parameters in NO_PARAMETERS
            else RequestOptions.from_parameters(
                request_parameters(parameters), self.default_normalize, self.hidden_size
            ).truncate
        )
        adapter_tensor = inputs.get("ADAPTER_ID")
        if adapter_tensor is None:
            adapter_ids = NO_ADAPTER if len(texts) == 1 else np.full((len(texts), 1), b"", dtype=object)
        else:
            adapter_ids = adapter_tensor.as_numpy().reshape(-1, 1)
            if len(adapter_ids) == 1:
                adapter_ids = np.repeat(adapter_ids, len(texts), axis=0)
        return self.tokenizer.decode_texts(list(texts)), adapter_ids, truncate

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed = {}
        for index, request in enumerate(requests):
            try:
                parsed[index] = self._read_request(request)
            except RequestError as error:
                responses[index] = _error_response(error)
        indices = list(parsed)
        try:
            encoded = self.tokenizer.encode_requests([parsed[i][0] for i in indices], [parsed[i][2] for i in indices])
        except Exception as error:  # a tokenizer failure must not take the other requests down silently
            encoded = [error] * len(indices)
        for index, result in zip(indices, encoded):
            if isinstance(result, Exception):
                code = "INVALID_ARG" if isinstance(result, LoraEmbedError) else "INTERNAL"
                responses[index] = _error_response(result, code)
                continue
            input_ids, attention_mask = result
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("INPUT_IDS", input_ids),
                    pb_utils.Tensor("ATTENTION_MASK", attention_mask),
                    pb_utils.Tensor("ENCODER_ADAPTER_ID", parsed[index][1]),
                ]
            )
        return responses
