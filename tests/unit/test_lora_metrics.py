"""Adapter counters published as metrics: differences between snapshots become counter increments
and gauge values, on families made the way `model.py` makes them (a fake `pb_utils.MetricFamily`)."""

from __future__ import annotations

import numpy as np
import pytest

from loraembed.engine import EncoderRequest
from loraembed.lora.metrics import (
    COUNTER,
    GAUGE,
    METRIC_DEFINITIONS,
    AdapterMetrics,
    AdapterMetricsPublisher,
    AdapterUsage,
    MetricUpdate,
    metric_updates,
)


class FakeMetric:
    def __init__(self, kind: str, labels: dict):
        self.kind, self.labels, self.value, self.calls = kind, labels, 0.0, 0

    def increment(self, value: float) -> None:
        assert self.kind == COUNTER and value > 0, "Triton counters only go up"
        self.value += value
        self.calls += 1

    def set(self, value: float) -> None:
        assert self.kind == GAUGE, "only gauges are set"
        self.value = value
        self.calls += 1


class FakeFamily:
    def __init__(self, name: str, description: str, kind: str):
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[FakeMetric] = []

    def Metric(self, labels: dict) -> FakeMetric:  # noqa: N802 - pb_utils' spelling
        assert all(isinstance(value, str) for value in labels.values())
        self.metrics.append(FakeMetric(self.kind, labels))
        return self.metrics[-1]


def _snapshot(usage=None, **fields) -> AdapterMetrics:
    return AdapterMetrics(usage={name: AdapterUsage(*counts) for name, counts in (usage or {}).items()}, **fields)


def test_names_follow_prometheus_conventions():
    names = [definition.name for definition in METRIC_DEFINITIONS]
    assert len(set(names)) == len(names)
    for definition in METRIC_DEFINITIONS:
        assert definition.name.startswith("loraembed_")
        assert definition.name.endswith("_total") == (definition.kind == COUNTER), definition.name


def test_first_publication_sends_totals_and_every_gauge():
    current = _snapshot({"": (1, 3, 30), "tenant": (2, 2, 12)}, loads=1, load_seconds=0.25, resident=1, capacity=4,
                        forward_passes=2, forward_tokens=42, graph_replays=1, graph_captures=1, graphs_resident=1)
    assert set(metric_updates(None, current)) == {
        MetricUpdate("loraembed_adapter_requests_total", "(base)", 1),
        MetricUpdate("loraembed_adapter_requests_total", "tenant", 2),
        MetricUpdate("loraembed_adapter_texts_total", "(base)", 3),
        MetricUpdate("loraembed_adapter_texts_total", "tenant", 2),
        MetricUpdate("loraembed_adapter_tokens_total", "(base)", 30),
        MetricUpdate("loraembed_adapter_tokens_total", "tenant", 12),
        MetricUpdate("loraembed_adapter_loads_total", None, 1),
        MetricUpdate("loraembed_adapter_load_seconds_total", None, 0.25),
        MetricUpdate("loraembed_adapters_resident", None, 1),
        MetricUpdate("loraembed_adapter_slots", None, 4),
        MetricUpdate("loraembed_forward_passes_total", None, 2),
        MetricUpdate("loraembed_forward_tokens_total", None, 42),
        MetricUpdate("loraembed_forward_passes_graphed_total", None, 1),
        MetricUpdate("loraembed_cuda_graph_captures_total", None, 1),
        MetricUpdate("loraembed_cuda_graphs_resident", None, 1),
    }


def test_later_publications_send_only_differences():
    before = _snapshot({"": (1, 3, 30), "a": (1, 1, 5)}, loads=1, evictions=0, resident=2, capacity=2)
    after = _snapshot({"": (1, 3, 30), "a": (2, 4, 25), "b": (1, 1, 7)}, loads=2, evictions=1, resident=2, capacity=2,
                      load_failures=1)
    assert set(metric_updates(before, after)) == {
        MetricUpdate("loraembed_adapter_requests_total", "a", 1),
        MetricUpdate("loraembed_adapter_texts_total", "a", 3),
        MetricUpdate("loraembed_adapter_tokens_total", "a", 20),
        MetricUpdate("loraembed_adapter_requests_total", "b", 1),
        MetricUpdate("loraembed_adapter_texts_total", "b", 1),
        MetricUpdate("loraembed_adapter_tokens_total", "b", 7),
        MetricUpdate("loraembed_adapter_loads_total", None, 1),
        MetricUpdate("loraembed_adapter_evictions_total", None, 1),
        MetricUpdate("loraembed_adapter_load_failures_total", None, 1),
    }  # resident and slots unchanged: no gauge update
    assert metric_updates(after, after) == []


def test_publisher_accumulates_totals_on_labelled_metrics():
    families: dict[str, FakeFamily] = {}

    def make_family(name, description, kind):
        families[name] = FakeFamily(name, description, kind)
        return families[name]

    publisher = AdapterMetricsPublisher(make_family, {"model": "encoder", "instance": "encoder_0"})
    assert set(families) == {definition.name for definition in METRIC_DEFINITIONS}
    snapshots = [
        _snapshot({"": (1, 2, 20)}, resident=0, capacity=2),
        _snapshot({"": (1, 2, 20), "a": (1, 1, 9)}, loads=1, load_seconds=0.5, resident=1, capacity=2),
        _snapshot({"": (3, 5, 50), "a": (1, 1, 9), "b": (2, 2, 10)}, loads=2, load_seconds=0.75, resident=2,
                  capacity=2),
        _snapshot({"": (3, 5, 50), "a": (1, 1, 9), "b": (2, 2, 10)}, loads=2, load_seconds=0.75, resident=2,
                  capacity=2),
    ]
    for snapshot in snapshots:
        publisher.publish(snapshot)

    def value(name, adapter=None):
        [metric] = [m for m in families[name].metrics if m.labels.get("adapter") == adapter]
        assert {k: v for k, v in metric.labels.items() if k != "adapter"} == {"model": "encoder", "instance": "encoder_0"}
        return metric.value

    assert [value("loraembed_adapter_texts_total", adapter) for adapter in ("(base)", "a", "b")] == [5, 1, 2]
    assert value("loraembed_adapter_tokens_total", "(base)") == 50
    assert value("loraembed_adapter_loads_total") == 2
    assert value("loraembed_adapter_load_seconds_total") == pytest.approx(0.75)
    assert (value("loraembed_adapters_resident"), value("loraembed_adapter_slots")) == (2, 2)
    assert value("loraembed_adapter_evictions_total") == 0  # shown from the start, never changed
    # One metric object per (family, adapter); the unchanged last snapshot made no calls.
    assert len(families["loraembed_adapter_texts_total"].metrics) == 3
    # The first publication: 3 counters of the base model and all 3 gauges.
    assert sum(m.calls for family in families.values() for m in family.metrics) == 6 + 6 + 9
    publisher.close()


def test_engine_counts_forward_passes_and_their_tokens(make_engine, minilm_path):
    engine = make_engine(minilm_path, max_batch_tokens=256, max_seq_len=128)
    before = engine.metrics_snapshot()
    ids = np.full((5, 100), 1000, dtype=np.int64)  # 500 tokens: two passes within 256 tokens each
    [result] = engine.embed([EncoderRequest(ids, np.ones_like(ids))])
    after = engine.metrics_snapshot()
    assert (after.graph_replays, after.graph_captures, after.graphs_resident) == (0, 0, 0)  # the CPU: all eager
    assert not isinstance(result, Exception)
    assert after.forward_passes - before.forward_passes == 3  # 2 + 2 + 1 sequences of 100 tokens
    assert after.forward_tokens - before.forward_tokens == 500
    assert after.usage[""].tokens - (before.usage[""].tokens if "" in before.usage else 0) == 500


def test_warm_up_batches_are_not_counted(make_engine, minilm_path):
    """The base model's warm-up (a query and a full batch) runs forward passes that the metrics never see."""
    engine = make_engine(minilm_path, max_batch_tokens=512, max_seq_len=128, warmup="true")
    engine.warm_up()
    snapshot = engine.metrics_snapshot()
    assert (snapshot.forward_passes, snapshot.forward_tokens, dict(snapshot.usage)) == (0, 0, {})
    ids = np.full((2, 10), 1000, dtype=np.int64)
    engine.embed([EncoderRequest(ids, np.ones_like(ids))])
    snapshot = engine.metrics_snapshot()
    assert (snapshot.forward_passes, snapshot.forward_tokens, snapshot.usage[""].texts) == (1, 20, 2)


def test_a_failed_warm_up_raises_and_still_counts_nothing(make_engine, minilm_path, monkeypatch):
    """A warm-up batch that fails raises (the encoder model logs it and serves without the warm-up);
    what ran before it is not counted either."""
    engine = make_engine(minilm_path, max_batch_tokens=384, max_seq_len=128, warmup="true")
    real_embed = engine.embed
    calls = []

    def failing_second_batch(requests):
        calls.append(len(requests))
        results = real_embed(requests)
        return results if len(calls) == 1 else [RuntimeError("device on fire")] * len(results)

    monkeypatch.setattr(engine, "embed", failing_second_batch)
    with pytest.raises(RuntimeError, match=r"^the warm-up batch of 3 texts failed: device on fire$"):
        engine.warm_up()
    snapshot = engine.metrics_snapshot()
    assert (snapshot.forward_passes, dict(snapshot.usage)) == (0, {})


def test_the_engine_reports_its_cuda_graph_counts(make_engine, minilm_path, monkeypatch):
    """metrics_snapshot takes replays, captures, evictions and graphs kept from the engine's CUDA
    graphs (a stand-in here: the CPU has none), beside the registry's counts."""
    from types import SimpleNamespace

    engine = make_engine(minilm_path, max_batch_tokens=640, max_seq_len=128)
    graphs = SimpleNamespace(replays=7, captures=3, evictions=1, graphs={"a": None, "b": None})
    monkeypatch.setattr(engine, "graphed", graphs)
    snapshot = engine.metrics_snapshot()
    assert (snapshot.graph_replays, snapshot.graph_captures, snapshot.graph_evictions, snapshot.graphs_resident) == (7, 3, 1, 2)
    assert snapshot.forward_passes == engine.adapters.snapshot().forward_passes
    updates = {update.name: update.value for update in metric_updates(None, snapshot)}
    assert (updates["loraembed_forward_passes_graphed_total"], updates["loraembed_cuda_graph_captures_total"],
            updates["loraembed_cuda_graph_evictions_total"], updates["loraembed_cuda_graphs_resident"]) == (7, 3, 1, 2)


def test_warmup_resolves_per_device():
    """"auto" warms up on CUDA only; a value that did not come through ServingConfig's parser is refused."""
    import torch

    from loraembed.engine import resolve_warmup
    from loraembed.errors import ConfigurationError

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [resolve_warmup(name, device) for name in ("auto", "true", "false") for device in (cpu, cuda)] == [
        False, True, True, True, False, False]
    with pytest.raises(ConfigurationError, match=r"^warmup='yes' is not auto, true or false$"):
        resolve_warmup("yes", cpu)


def test_gemm_tuning_resolves_per_device_and_dtype():
    """"auto" and "true" tune where cuBLASLt runs the linears (CUDA, 16-bit floats) and nowhere else."""
    import torch

    from loraembed.engine import resolve_gemm_tuning
    from loraembed.errors import ConfigurationError

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [resolve_gemm_tuning(name, device, dtype) for name in ("auto", "true", "false")
            for device, dtype in ((cpu, torch.float32), (cuda, torch.float32), (cuda, torch.bfloat16))] == [
        False, False, True, False, False, True, False, False, False]
    with pytest.raises(ConfigurationError, match=r"^gemm_tuning='on' is not auto, true or false$"):
        resolve_gemm_tuning("on", cpu, torch.float32)


def test_linear_shapes_are_the_four_linears_of_a_layer_with_the_activations_epilogue():
    from dataclasses import replace

    from loraembed.config import EncoderConfig
    from loraembed.engine import linear_shapes

    base = EncoderConfig(model_type="xlm-roberta", vocab_size=10, hidden_size=768, num_hidden_layers=1,
                         num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                         max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
    # exact GELU has no epilogue: F.linear, then its own pass
    assert linear_shapes(base) == [(2304, 768, None), (768, 768, None), (3072, 768, None), (768, 3072, None)]
    assert linear_shapes(base.with_gelu_approximation("tanh"))[2] == (3072, 768, "gelu")
    assert linear_shapes(replace(base, hidden_act="relu", intermediate_size=1024))[2:] == [(1024, 768, "relu"), (768, 1024, None)]
