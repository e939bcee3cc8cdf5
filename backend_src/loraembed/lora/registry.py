"""Which adapter ids can be served, where their files are, and which device slot holds each.

Adapter ids are names, never paths: `[A-Za-z0-9._-]+` (not `.` or `..`, at most
`MAX_ADAPTER_ID_LENGTH` characters), the name of a sub-folder of `adapter_root`; with
`allow_hub_adapters`, also `org/name[@revision]` from the Hugging Face hub (or its offline cache).
A folder, and every adapter file in it, must resolve (symlinks followed) inside `adapter_root`.

`AdapterRegistry` loads an adapter on first use into one of `max_adapters` device slots, evicting
the least recently used adapter that the current batch does not use. `acquire` pins the slots a
batch needs and `release` unpins them. A local adapter whose files changed on disk (inode, mtime or
size of `adapter_config.json` / the weight file, checked at every `acquire`) is read again into its
slot; hub adapters are fetched once per process. A failed load answers only the requests that
named that adapter, and is not retried until its files change.

`MergedAdapterRegistry` serves one adapter merged into the base weights (`merge_adapter`).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..config import ServingConfig
from ..encoder import PackedEncoder
from ..errors import AdapterError, ConfigurationError
from ..packing import PackedBatch
from .layers import LoraLayers, lora_module_shapes, merge_lora_adapter
from .metrics import AdapterCounters, AdapterMetrics
from .peft_format import ADAPTER_FILES, LoraAdapter, read_peft_adapter

BASE_ADAPTER_ID = ""
MAX_ADAPTER_ID_LENGTH = 128
LOCAL_ADAPTER_ID = re.compile(r"[A-Za-z0-9._-]+")
# Hub repo ids start with a letter or digit; a revision is a branch, tag or commit (may hold '/').
HUB_ADAPTER_ID = re.compile(
    r"(?P<repo_id>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*))?"
)
SHOWN_ID_CHARACTERS = 40


@dataclass(frozen=True)
class AdapterName:
    """A validated adapter id: a folder name under adapter_root, or a hub repo (and revision)."""

    adapter_id: str
    repo_id: str | None = None  # set for hub adapters
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


def _shown(adapter_id: str) -> str:
    if len(adapter_id) <= SHOWN_ID_CHARACTERS:
        return repr(adapter_id)
    return repr(adapter_id[:SHOWN_ID_CHARACTERS]) + "..."


def parse_adapter_id(adapter_id: str, allow_hub_adapters: bool) -> AdapterName:
    """Validate a non-empty adapter id sent by a client; raise AdapterError saying what is wrong."""
    if len(adapter_id) > MAX_ADAPTER_ID_LENGTH:
        raise AdapterError(
            f"adapter id {_shown(adapter_id)} is {len(adapter_id)} characters long; "
            f"the limit is {MAX_ADAPTER_ID_LENGTH}"
        )
    if LOCAL_ADAPTER_ID.fullmatch(adapter_id):
        if adapter_id in (".", ".."):
            raise AdapterError(f"adapter id {adapter_id!r} is not valid: '.' and '..' are not adapter names")
        return AdapterName(adapter_id)
    hub = HUB_ADAPTER_ID.fullmatch(adapter_id)
    if hub and not any(part in (".", "..") for part in (hub.group("revision") or "").split("/")):
        if not allow_hub_adapters:
            raise AdapterError(
                f"adapter id {adapter_id!r} names a hub adapter (org/name[@revision]), but allow_hub_adapters is off"
            )
        return AdapterName(adapter_id, hub.group("repo_id"), hub.group("revision"))
    if "/" in adapter_id or "\\" in adapter_id:
        raise AdapterError(
            f"adapter id {_shown(adapter_id)} is not valid: adapter ids are names, not paths "
            f"(A-Z a-z 0-9 . _ - only; org/name[@revision] for a hub adapter)"
        )
    raise AdapterError(
        f"adapter id {_shown(adapter_id)} is not valid: use 1 to {MAX_ADAPTER_ID_LENGTH} characters "
        f"from A-Z a-z 0-9 . _ - (or org/name[@revision] for a hub adapter)"
    )


class AdapterLocator:
    """Turns validated adapter ids into folders: under adapter_root, or downloaded from the hub."""

    def __init__(self, adapter_root: str, allow_hub_adapters: bool):
        self.allow_hub_adapters = allow_hub_adapters
        self.root: Path | None = None
        if adapter_root:
            root = Path(adapter_root).expanduser()
            if not root.is_dir():
                raise ConfigurationError(f"adapter_root {adapter_root!r} is not a folder")
            self.root = root.resolve()
            self._root_text = str(self.root)

    def parse(self, adapter_id: str) -> AdapterName:
        return parse_adapter_id(adapter_id, self.allow_hub_adapters)

    def folder(self, name: AdapterName) -> Path:
        """The adapter's folder; AdapterError if it is missing, unreachable or outside adapter_root."""
        return Path(self.folder_and_signature(name)[0])

    def folder_and_signature(self, name: AdapterName) -> tuple[str, tuple | None]:
        """The adapter's folder (a string: this runs at every batch, and a Path costs ~10 µs) and,
        for a local one, its files' signature (`file_signature`'s value) from the same system
        calls; AdapterError as `folder`."""
        if name.is_hub:
            return str(self._download(name)), None
        return self._local_folder(name.adapter_id)

    def _inside_root(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root)

    def _local_folder(self, adapter_id: str) -> tuple[str, tuple]:
        if self.root is None:
            raise AdapterError(f"adapter {adapter_id!r} is not available: no adapter_root is configured")
        try:
            return self._resolve_local_folder(adapter_id)
        except (FileNotFoundError, NotADirectoryError):  # no such folder, or a link to a path through a file
            raise AdapterError(f"adapter {adapter_id!r} not found: adapter_root has no folder of that name") from None
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13) or an unreadable path
            raise AdapterError(
                f"adapter {adapter_id!r} cannot be resolved (a symlink loop or an unreadable path); it is not served"
            ) from None

    def _resolve_local_folder(self, adapter_id: str) -> tuple[str, tuple]:
        """Runs at every batch for every adapter it names, so with few system calls: the id is one
        name under the resolved root, so the folder and each file need resolving only where they
        are symlinks (one lstat each otherwise, whose result is also the signature's)."""
        if os.sep in adapter_id or adapter_id in (".", ".."):  # parse_adapter_id allows none; kept as a second lock
            raise AdapterError(f"adapter {adapter_id!r} resolves outside adapter_root; it is not served")
        candidate = os.path.join(self._root_text, adapter_id)  # strings: pathlib costs more than the calls
        info = os.lstat(candidate)
        folder = candidate
        if stat.S_ISLNK(info.st_mode):
            resolved = Path(candidate).resolve()
            if not resolved.is_relative_to(self.root) or resolved == self.root:
                raise AdapterError(f"adapter {adapter_id!r} resolves outside adapter_root; it is not served")
            folder = str(resolved)
            info = os.stat(folder)
        if not stat.S_ISDIR(info.st_mode):
            raise AdapterError(f"adapter {adapter_id!r} not found: adapter_root has no folder of that name")
        entries: list[tuple] = [(folder,)]
        for file_name in ADAPTER_FILES:
            path = os.path.join(folder, file_name)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                entries.append((file_name, None))
                continue
            if stat.S_ISLNK(info.st_mode):
                if not self._inside_root(Path(path)):
                    raise AdapterError(
                        f"adapter {adapter_id!r}: {file_name} resolves outside adapter_root; it is not served"
                    )
                try:
                    info = os.stat(path)
                except (FileNotFoundError, NotADirectoryError):  # a dangling link inside the root: as a missing
                    entries.append((file_name, None))  # file (any other error: refused, as it cannot be followed)
                    continue
            entries.append((file_name, info.st_ino, info.st_mtime_ns, info.st_size))
        return folder, tuple(entries)

    def _download(self, name: AdapterName) -> Path:
        from huggingface_hub import snapshot_download

        options = {"repo_id": name.repo_id, "revision": name.revision or "main", "allow_patterns": list(ADAPTER_FILES)}
        try:
            return Path(snapshot_download(**options))
        except Exception as online_error:  # hub errors have many types; fall back to the offline cache
            try:
                return Path(snapshot_download(**options, local_files_only=True))
            except Exception:
                raise AdapterError(
                    f"hub adapter {name.adapter_id!r} is not available from the hub or its offline cache "
                    f"({type(online_error).__name__})"
                ) from None


def file_signature(folder: Path) -> tuple:
    """What changes when an adapter folder's files are replaced: path, inode, mtime and size (the
    reference `AdapterLocator.folder_and_signature` is tested against)."""
    entries: list[tuple] = [(str(folder),)]
    for file_name in ADAPTER_FILES:
        try:
            info = (folder / file_name).stat()
        except OSError:
            entries.append((file_name, None))
            continue
        entries.append((file_name, info.st_ino, info.st_mtime_ns, info.st_size))
    return tuple(entries)


@dataclass
class _ResidentAdapter:
    adapter_id: str
    slot: int
    signature: tuple | None  # None: a hub adapter, never re-read


class AdapterRegistry:
    """Adapter ids -> device slots of the encoder's LoRA layers (slot 0 = the base model).

    The engine calls `acquire(ids)` once per group of requests, `activate(batch)` before each
    forward pass and `release()` after the group. Not thread-safe: one engine per thread.
    """

    def __init__(self, model: PackedEncoder, serving: ServingConfig):
        self.max_adapters = serving.max_adapters
        self.max_lora_rank = serving.max_lora_rank
        self.locator = AdapterLocator(serving.adapter_root, serving.allow_hub_adapters)
        self.layers = LoraLayers(model, num_slots=serving.max_adapters + 1)
        self.module_shapes = self.layers.module_shapes
        self.counters = AdapterCounters()
        self._resident: OrderedDict[str, _ResidentAdapter] = OrderedDict()  # least recently used first
        self._slot_owner: list[str | None] = [BASE_ADAPTER_ID] + [None] * serving.max_adapters
        self._pinned: set[str] = set()
        self._failures: dict[str, tuple[tuple, str]] = {}  # id -> (file signature, error message)
        self._preload(serving.adapter_preload)

    @property
    def max_adapters_per_batch(self) -> int:
        """Distinct adapters one acquire can hold; the engine splits larger groups of requests."""
        return self.max_adapters

    def _preload(self, adapter_ids: Sequence[str]) -> None:
        wanted = set(adapter_ids) - {BASE_ADAPTER_ID}
        if len(wanted) > self.max_adapters:
            raise ConfigurationError(
                f"adapter_preload names {len(wanted)} adapters, more than max_adapters={self.max_adapters}"
            )
        results = self.acquire(wanted)
        self.release()
        failures = [str(result) for result in results.values() if isinstance(result, AdapterError)]
        if failures:
            raise ConfigurationError("adapter_preload failed: " + "; ".join(failures))

    def resident_adapters(self) -> list[str]:
        """Ids in device slots, least recently used first."""
        return list(self._resident)

    def acquire(self, adapter_ids: set[str]) -> dict[str, int | AdapterError]:
        """A slot for each id (loading as needed, pinned until `release`), or the AdapterError it earned."""
        slots: dict[str, int | AdapterError] = {}
        # Resident adapters first, so loading the others never evicts one that this batch uses.
        for adapter_id in sorted(adapter_ids, key=lambda name: (name not in self._resident, name)):
            if adapter_id == BASE_ADAPTER_ID:
                slots[adapter_id] = 0
                continue
            try:
                slots[adapter_id] = self._acquire_one(adapter_id)
            except AdapterError as error:
                slots[adapter_id] = error
        return slots

    def activate(self, batch: PackedBatch, plan_layers: bool = True) -> None:
        """Count the batch about to run, and point the LoRA layers at its adapter segments (not
        with `plan_layers=False`: a CUDA graph replay, which takes them as device inputs)."""
        if plan_layers:
            self.layers.activate(batch.adapter_segments)
        else:
            self.layers.deactivate()
        self.counters.count_batch(batch, lambda slot: self._slot_owner[slot] or BASE_ADAPTER_ID)

    def release(self) -> None:
        self._pinned.clear()
        self.layers.deactivate()

    def count_requests(self, adapter_ids_per_request: Iterable[Sequence[str]]) -> None:
        self.counters.count_requests(adapter_ids_per_request)

    def snapshot(self) -> AdapterMetrics:
        return self.counters.snapshot(resident=len(self._resident), capacity=self.max_adapters)

    def _acquire_one(self, adapter_id: str) -> int:
        name = self.locator.parse(adapter_id)
        resident = self._resident.get(adapter_id)
        if resident is not None and name.is_hub:
            return self._use(resident)
        try:
            folder, signature = self.locator.folder_and_signature(name)
        except AdapterError:
            if resident is not None:  # its folder is gone or now points elsewhere: stop serving it
                self._unload(resident)
            raise
        if resident is not None:
            if resident.signature == signature:
                return self._use(resident)
            started = time.perf_counter()
            try:
                adapter = self._read(adapter_id, folder, signature)
            except AdapterError:
                self._unload(resident)  # its files changed into something unservable: stop serving it
                raise
            self._load(resident.slot, adapter, started)
            resident.signature = signature
            self.counters.reloads += 1
            return self._use(resident)
        started = time.perf_counter()
        adapter = self._read(adapter_id, folder, signature)  # before evicting anything for it
        slot = self._free_slot(adapter_id)
        self._load(slot, adapter, started)
        resident = _ResidentAdapter(adapter_id, slot, signature)
        self._resident[adapter_id] = resident
        self._slot_owner[slot] = adapter_id
        return self._use(resident)

    def _use(self, resident: _ResidentAdapter) -> int:
        self._pinned.add(resident.adapter_id)
        self._resident.move_to_end(resident.adapter_id)
        return resident.slot

    def _read(self, adapter_id: str, folder: str, signature: tuple | None) -> LoraAdapter:
        failure = self._failures.get(adapter_id)
        if failure is not None and signature is not None and failure[0] == signature:
            raise AdapterError(failure[1])  # unchanged files: the same answer without reading them
        try:
            adapter = read_peft_adapter(Path(folder), adapter_id, self.module_shapes, self.max_lora_rank)
        except Exception as error:  # any failure answers only this adapter's requests, never the batch
            if not isinstance(error, AdapterError):  # e.g. a config value of a type PEFT's rules never expect
                error = AdapterError(
                    f"adapter {adapter_id!r} cannot be served: reading it failed ({type(error).__name__}: {error})"
                )
            self.counters.load_failures += 1
            if signature is not None:
                self._failures[adapter_id] = (signature, str(error))
            raise error from None
        self._failures.pop(adapter_id, None)
        return adapter

    def _load(self, slot: int, adapter: LoraAdapter, started: float) -> None:
        self.layers.load(slot, adapter)
        self.counters.loads += 1
        self.counters.load_seconds += time.perf_counter() - started

    def _free_slot(self, adapter_id: str) -> int:
        """An empty slot, or the least recently used unpinned one (evicting its adapter)."""
        for slot in range(1, self.max_adapters + 1):
            if self._slot_owner[slot] is None:
                return slot
        victim = next((r for r in self._resident.values() if r.adapter_id not in self._pinned), None)
        if victim is None:
            raise AdapterError(
                f"adapter {adapter_id!r} cannot be loaded: all max_adapters={self.max_adapters} device slots "
                f"hold adapters of this batch"
            )
        self._unload(victim)
        self.counters.evictions += 1
        return victim.slot

    def _unload(self, resident: _ResidentAdapter) -> None:
        self.layers.clear(resident.slot)
        self._slot_owner[resident.slot] = None
        self._pinned.discard(resident.adapter_id)
        del self._resident[resident.adapter_id]


class MergedAdapterRegistry:
    """`merge_adapter`: one adapter added to the base weights at start; only it is served.

    Both `""` and its id mean that adapter; other ids get an AdapterError. Its files are read once.
    """

    max_adapters_per_batch = None  # no slots: every request runs on the merged weights

    def __init__(self, model: PackedEncoder, serving: ServingConfig):
        self.merged_id = serving.merge_adapter
        others = sorted(set(serving.adapter_preload) - {self.merged_id, BASE_ADAPTER_ID})
        if others:
            raise ConfigurationError(
                f"adapter_preload {', '.join(others)} cannot be served with merge_adapter={self.merged_id!r}, "
                f"which serves only the merged adapter"
            )
        self.counters = AdapterCounters()
        started = time.perf_counter()
        try:
            locator = AdapterLocator(serving.adapter_root, serving.allow_hub_adapters)
            folder = locator.folder(locator.parse(self.merged_id))
            adapter = read_peft_adapter(folder, self.merged_id, lora_module_shapes(model), serving.max_lora_rank)
        except AdapterError as error:
            raise ConfigurationError(f"merge_adapter: {error}") from None
        merge_lora_adapter(model, adapter)
        self.counters.loads = 1
        self.counters.load_seconds = time.perf_counter() - started

    def acquire(self, adapter_ids: set[str]) -> dict[str, int | AdapterError]:
        return {
            adapter_id: 0
            if adapter_id in (BASE_ADAPTER_ID, self.merged_id)
            else AdapterError(
                f"adapter {adapter_id!r} is not served: this server has adapter {self.merged_id!r} merged into "
                f"the base model and serves only it ('' or {self.merged_id!r})"
            )
            for adapter_id in adapter_ids
        }

    def activate(self, batch: PackedBatch, plan_layers: bool = True) -> None:
        self.counters.count_batch(batch, lambda slot: self.merged_id)

    def release(self) -> None:
        pass

    def count_requests(self, adapter_ids_per_request: Iterable[Sequence[str]]) -> None:
        self.counters.count_requests([self.merged_id] * len(ids) for ids in adapter_ids_per_request)

    def snapshot(self) -> AdapterMetrics:
        return self.counters.snapshot(resident=1, capacity=1)


def create_adapter_registry(
    model: PackedEncoder, serving: ServingConfig
) -> AdapterRegistry | MergedAdapterRegistry | None:
    """The registry the serving config asks for; None when no adapter setting is used."""
    if serving.merge_adapter:
        return MergedAdapterRegistry(model, serving)
    if serving.adapter_root or serving.adapter_preload or serving.allow_hub_adapters:
        return AdapterRegistry(model, serving)
    return None
