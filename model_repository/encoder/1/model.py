"""Triton Python model `encoder`: INPUT_IDS, ATTENTION_MASK (+ optional ADAPTER_ID) -> EMBEDDING.
Thin: validation, packing, LoRA and the forward pass are loraembed.engine.EmbeddingEngine; the
metrics it publishes (adapters, forward passes, CUDA graphs) are loraembed.lora.metrics."""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from loraembed.errors import InvalidInputError, RequestError, WarmupError
from loraembed.lora.metrics import COUNTER, AdapterMetricsPublisher
from loraembed.triton_params import decode_strings, instance_device, parameters_from_model_config, request_parameters

assert np.__version__.startswith("1."), f"Triton 2.51's Python stub needs numpy<2, found {np.__version__}"


def _error_response(message: str, code_name: str):
    code = getattr(pb_utils.TritonError, code_name)
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _metric_family(name: str, description: str, kind: str):
    kind = pb_utils.MetricFamily.COUNTER if kind == COUNTER else pb_utils.MetricFamily.GAUGE
    return pb_utils.MetricFamily(name=name, description=description, kind=kind)


def _read_request(request) -> EncoderRequest:
    inputs = {tensor.name(): tensor for tensor in request.inputs()}  # one call, not one per name
    adapter_tensor = inputs.get("ADAPTER_ID")
    try:
        adapter_ids = None if adapter_tensor is None else decode_strings(adapter_tensor.as_numpy())
    except UnicodeDecodeError:
        raise InvalidInputError("ADAPTER_ID is not valid UTF-8") from None
    return EncoderRequest(
        input_ids=inputs["INPUT_IDS"].as_numpy(),
        attention_mask=inputs["ATTENTION_MASK"].as_numpy(),
        adapter_ids=adapter_ids,
        parameters=request_parameters(request.parameters()),
    )


class TritonPythonModel:
    def initialize(self, args):
        started = time.perf_counter()
        model_config = json.loads(args["model_config"])
        serving = ServingConfig.from_parameters(parameters_from_model_config(model_config))
        device = instance_device(args["model_instance_kind"], args["model_instance_device_id"], serving.cpu_threads)
        self.engine = EmbeddingEngine(serving, device)
        if self.engine.warmup_enabled:  # kernels compiled and graphs captured before Triton calls it ready
            try:
                self.engine.warm_up()
            except WarmupError as error:  # it only saves the first requests' time: serve without it
                pb_utils.Logger.log_error(f"loraembed encoder: serving without the warm-up: {error}")
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.metrics = AdapterMetricsPublisher(_metric_family, labels)
        self.metrics.publish(self.engine.metrics_snapshot())  # adapter_preload's loads, the gauges
        # Later snapshots are published by a thread, off the request path: each metric update is a
        # round trip to the server (5 per batch: 86 us each, 430 us of a 1.4 ms single-query execute
        # on a 2-core CPU). It publishes the latest snapshot within ~10 ms of a batch; batches that
        # come faster share one publication.
        self._snapshot = None
        self._snapshot_ready = threading.Event()
        self._stopping = False
        self._publisher = threading.Thread(target=self._publish_metrics, name="loraembed-metrics", daemon=True)
        self._publisher.start()
        pb_utils.Logger.log_info(f"loraembed encoder ready: {self.engine.describe()}")
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.engine.startup_seconds.items())
        pb_utils.Logger.log_info(
            f"loraembed encoder start-up of {args['model_instance_name']}: {phases}, "
            f"initialize {time.perf_counter() - started:.1f} s"
        )

    def execute(self, requests):
        responses = [None] * len(requests)
        readable, indices = [], []
        for index, request in enumerate(requests):
            try:
                readable.append(_read_request(request))
                indices.append(index)
            except RequestError as error:
                responses[index] = _error_response(str(error), "INVALID_ARG")
        try:
            results = self.engine.embed(readable)
        except Exception as error:  # keep serving: this batch fails, the next one runs
            results = [RuntimeError(f"internal error in the encoder: {type(error).__name__}: {error}")] * len(readable)
        Tensor, InferenceResponse = pb_utils.Tensor, pb_utils.InferenceResponse
        for index, result in zip(indices, results):
            if type(result) is np.ndarray:  # most results: checked first
                responses[index] = InferenceResponse(output_tensors=[Tensor("EMBEDDING", result)])
            elif isinstance(result, RequestError):
                responses[index] = _error_response(str(result), "INVALID_ARG")
            else:
                responses[index] = _error_response(str(result), "INTERNAL")
        try:
            self._snapshot = self.engine.metrics_snapshot()
            self._snapshot_ready.set()
        except Exception as error:  # metrics must never fail requests that were served
            pb_utils.Logger.log_error(f"loraembed encoder: reading the metrics failed: {error}")
        return responses

    def _publish_metrics(self):
        while not self._stopping:
            self._snapshot_ready.wait()
            time.sleep(0.01)  # let the batches of the next few ms join this publication
            self._snapshot_ready.clear()
            try:
                self.metrics.publish(self._snapshot)
            except Exception as error:  # keep publishing later snapshots
                pb_utils.Logger.log_error(f"loraembed encoder: publishing metrics failed: {error}")

    def finalize(self):
        self._stopping = True
        self._snapshot_ready.set()
        self._publisher.join(timeout=10)
        self.metrics.close()
