"""Adapter counters: plain numbers that `model.py` publishes as Triton metrics (no Triton here)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

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


class AdapterCounters:
    """Mutable counters behind `AdapterMetrics`; the registries own one each."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = defaultdict(int)
        self.texts: dict[str, int] = defaultdict(int)
        self.tokens: dict[str, int] = defaultdict(int)
        self.loads = self.reloads = self.load_failures = self.evictions = 0
        self.load_seconds = 0.0

    def count_requests(self, adapter_ids_per_request: Iterable[Sequence[str]]) -> None:
        for adapter_ids in adapter_ids_per_request:
            for adapter_id in set(adapter_ids):
                self.requests[adapter_id] += 1

    def count_batch(self, batch: PackedBatch, adapter_id_of_slot: Callable[[int], str]) -> None:
        """Texts and tokens per adapter of one packed batch, from its host-side segments."""
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
        )
