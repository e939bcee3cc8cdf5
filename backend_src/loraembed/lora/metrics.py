"""Adapter counters, and their publication as Prometheus-style metrics (no Triton here).

The registries count into `AdapterCounters`; `AdapterMetrics` is a snapshot of them (plus the
engine's CUDA-graph counts, `EmbeddingEngine.metrics_snapshot`);
`AdapterMetricsPublisher` turns the difference between two snapshots into increments and gauge
values on metric families that `model.py` creates with `pb_utils.MetricFamily`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..packing import PackedBatch


@dataclass(frozen=True)
class AdapterUsage:
    """Work done with one adapter id since start ("" = the base model)."""

    requests: int = 0  # requests that named the adapter for at least one of their texts
    texts: int = 0  # sequences embedded with it
    tokens: int = 0  # tokens run through the encoder with it


@dataclass(frozen=True)
class AdapterMetrics:
    """A snapshot of the adapter counters; counts are totals since start, gauges are current."""

    usage: Mapping[str, AdapterUsage]
    loads: int = 0  # successful reads of adapter files into a device slot (reloads included)
    reloads: int = 0  # loads because a resident adapter's files changed
    load_failures: int = 0  # attempts whose files failed validation or could not be read
    evictions: int = 0  # resident adapters dropped to make room (LRU)
    load_seconds: float = 0.0  # total time spent loading
    resident: int = 0  # gauge: adapters in device slots now
    capacity: int = 0  # gauge: device slots for adapters (max_adapters; 0 when none are served)
    forward_passes: int = 0  # encoder forward passes (packed batches) run
    forward_tokens: int = 0  # tokens in those forward passes, all adapters together
    # CUDA graphs (`cuda_graphs.GraphedForward`; all 0 on the CPU): forward passes that were replays
    # (the others ran eagerly, launch by launch), captures, evictions, and graphs kept now (gauge).
    graph_replays: int = 0
    graph_captures: int = 0
    graph_evictions: int = 0
    graphs_resident: int = 0


class AdapterCounters:
    """Mutable counters behind `AdapterMetrics`; the registries own one each."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = defaultdict(int)
        self.texts: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.loads = self.reloads = self.load_failures = self.evictions = 0
        self.load_seconds = 0.0
        self.forward_passes = self.forward_tokens = 0

    def reset_usage(self) -> None:
        """Forget the requests, texts, tokens and forward passes counted so far (the engine's warm-up
        batches); loads, evictions and load failures stay."""
        self.requests.clear()
        self.texts.clear()
        self.tokens.clear()
        self.forward_passes = self.forward_tokens = 0

    def count_requests(self, adapter_ids_per_request: Iterable[Sequence[str]]) -> None:
        for adapter_ids in adapter_ids_per_request:
            for adapter_id in set(adapter_ids):
                self.requests[adapter_id] += 1

    def count_batch(self, batch: PackedBatch, adapter_id_of_slot: Callable[[int], str]) -> None:
        """Texts and tokens per adapter of one packed batch (one forward pass), from its host-side segments."""
        self.forward_passes += 1
        self.forward_tokens += batch.num_tokens
        sequence_start = 0
        lengths = iter(batch.sequence_lengths)
        for segment in batch.adapter_segments:
            adapter_id = adapter_id_of_slot(segment.slot)
            self.tokens[adapter_id] += segment.token_end - segment.token_start
            while sequence_start < segment.token_end:
                sequence_start += next(lengths)
                self.texts[adapter_id] += 1

    def snapshot(self, resident: int, capacity: int) -> AdapterMetrics:
        names = set(self.requests) | set(self.texts)
        usage = {
            name: AdapterUsage(self.requests.get(name, 0), self.texts.get(name, 0), self.tokens.get(name, 0))
            for name in sorted(names)
        }
        return AdapterMetrics(
            usage=usage,
            loads=self.loads,
            reloads=self.reloads,
            load_failures=self.load_failures,
            evictions=self.evictions,
            load_seconds=self.load_seconds,
            resident=resident,
            capacity=capacity,
            forward_passes=self.forward_passes,
            forward_tokens=self.forward_tokens,
        )


# --- publication ---------------------------------------------------------------------------------

COUNTER, GAUGE = "counter", "gauge"
BASE_MODEL_LABEL = "(base)"  # the `adapter` label of base-model rows ("" id); no adapter id can contain "("


@dataclass(frozen=True)
class MetricDefinition:
    name: str
    kind: str  # COUNTER or GAUGE
    description: str
    source: str  # the AdapterMetrics field (or, per adapter, AdapterUsage field) it publishes
    per_adapter: bool = False  # labelled by adapter id


METRIC_DEFINITIONS = (
    MetricDefinition("loraembed_adapter_requests_total", COUNTER,
                     "Encoder requests served that named the adapter for at least one text", "requests", True),
    MetricDefinition("loraembed_adapter_texts_total", COUNTER, "Texts embedded with the adapter", "texts", True),
    MetricDefinition("loraembed_adapter_tokens_total", COUNTER,
                     "Tokens run through the encoder with the adapter", "tokens", True),
    MetricDefinition("loraembed_adapter_loads_total", COUNTER,
                     "Adapter files read into a device slot (reloads included)", "loads"),
    MetricDefinition("loraembed_adapter_reloads_total", COUNTER,
                     "Loads of a resident adapter whose files changed on disk", "reloads"),
    MetricDefinition("loraembed_adapter_load_failures_total", COUNTER,
                     "Adapter loads that failed (invalid or unreadable files)", "load_failures"),
    MetricDefinition("loraembed_adapter_evictions_total", COUNTER,
                     "Resident adapters evicted (least recently used) to free a device slot", "evictions"),
    MetricDefinition("loraembed_adapter_load_seconds_total", COUNTER,
                     "Seconds spent loading adapters", "load_seconds"),
    MetricDefinition("loraembed_adapters_resident", GAUGE, "Adapters in device slots now", "resident"),
    MetricDefinition("loraembed_adapter_slots", GAUGE, "Device slots for adapters (max_adapters)", "capacity"),
    MetricDefinition("loraembed_forward_passes_total", COUNTER,
                     "Encoder forward passes (packed batches) run", "forward_passes"),
    MetricDefinition("loraembed_forward_tokens_total", COUNTER,
                     "Tokens in those forward passes; per pass: the ratio of the two rates", "forward_tokens"),
    MetricDefinition("loraembed_forward_passes_graphed_total", COUNTER,
                     "Forward passes run as CUDA graph replays; the rest of loraembed_forward_passes_total ran "
                     "eagerly (slower where the host sets the pace)", "graph_replays"),
    MetricDefinition("loraembed_cuda_graph_captures_total", COUNTER,
                     "CUDA graphs captured, one per new batch bucket (each costs a capture's time once)", "graph_captures"),
    MetricDefinition("loraembed_cuda_graph_evictions_total", COUNTER,
                     "CUDA graphs dropped to make room for another bucket's (not counted: adapter-batch graphs "
                     "dropped because an adapter of a higher rank grew the LoRA buffers)", "graph_evictions"),
    MetricDefinition("loraembed_cuda_graphs_resident", GAUGE, "CUDA graphs kept now", "graphs_resident"),
)


@dataclass(frozen=True)
class MetricUpdate:
    """One change to publish: add `value` to a counter, or set a gauge to `value`."""

    name: str
    adapter: str | None  # the `adapter` label value; None for metrics without it
    value: float


def adapter_label(adapter_id: str) -> str:
    return adapter_id or BASE_MODEL_LABEL


def metric_updates(previous: AdapterMetrics | None, current: AdapterMetrics) -> list[MetricUpdate]:
    """What changed from `previous` to `current` (None: nothing published yet): positive counter
    increments, and gauges whose value differs (all gauges on the first publication)."""
    updates = []
    for definition in METRIC_DEFINITIONS:
        if definition.per_adapter:
            for adapter_id, usage in current.usage.items():
                before = previous.usage.get(adapter_id) if previous is not None else None
                delta = getattr(usage, definition.source) - (getattr(before, definition.source) if before else 0)
                if delta > 0:
                    updates.append(MetricUpdate(definition.name, adapter_label(adapter_id), delta))
            continue
        value = getattr(current, definition.source)
        before = getattr(previous, definition.source) if previous is not None else None
        if definition.kind == GAUGE:
            if value != before:
                updates.append(MetricUpdate(definition.name, None, value))
        elif value - (before or 0) > 0:
            updates.append(MetricUpdate(definition.name, None, value - (before or 0)))
    return updates


class AdapterMetricsPublisher:
    """Publishes `AdapterMetrics` snapshots as metrics, by differences from the last one published.

    `make_family(name, description, kind)` returns a metric family (Triton: `pb_utils.MetricFamily`)
    whose `Metric(labels=...)` has `increment(value)` and `set(value)`. `labels` go on every metric
    (e.g. the Triton model and instance), and `adapter` on the per-adapter ones.
    """

    def __init__(self, make_family: Callable[[str, str, str], Any], labels: Mapping[str, str]):
        self.labels = dict(labels)
        self._definitions = {definition.name: definition for definition in METRIC_DEFINITIONS}
        self._families = {
            definition.name: make_family(definition.name, definition.description, definition.kind)
            for definition in METRIC_DEFINITIONS
        }
        self._metrics: dict[tuple[str, str | None], Any] = {}
        self._published: AdapterMetrics | None = None
        for definition in METRIC_DEFINITIONS:  # shown from the start (at 0), so rate() has a series
            if not definition.per_adapter:
                self._metric(definition.name, None)

    def publish(self, snapshot: AdapterMetrics) -> None:
        for update in metric_updates(self._published, snapshot):
            metric = self._metric(update.name, update.adapter)
            if self._definitions[update.name].kind == COUNTER:
                metric.increment(update.value)
            else:
                metric.set(update.value)
        self._published = snapshot

    def _metric(self, name: str, adapter: str | None) -> Any:
        metric = self._metrics.get((name, adapter))
        if metric is None:
            labels = self.labels if adapter is None else {**self.labels, "adapter": adapter}
            metric = self._metrics[(name, adapter)] = self._families[name].Metric(labels=labels)
        return metric

    def close(self) -> None:
        """Drop the metrics, then their families (Triton wants them deleted in that order)."""
        self._metrics.clear()
        self._families.clear()
