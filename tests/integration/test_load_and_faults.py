"""Reliability of the real model repository through a real tritonserver (issue 6): concurrent load
mixing the base model, six PEFT adapters in three device slots, unknown ids and bad input; adapter
folders deleted, replaced and corrupted while serving; adapter loads that fail inside a batch; a
500-text request split by max_batch_tokens with bounded memory; the encoder's stub process killed.
Embeddings after all of it equal those from before it.

One server for the module (tests run in file order and share its state):
max_adapters=3, max_batch_tokens=2048, max_seq_len=32 (short, so the CPU runs this in seconds),
and `--model-control-mode=explicit` so that a dead stub can be replaced by reloading the model.
References come from loraembed's EmbeddingEngine in this process (fp32, CPU), which the unit tests
hold to peft and sentence-transformers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tritonclient.utils import InferenceServerException

from loraembed.checkpoint import bundled_model_path
from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from loraembed.tokenization import TextTokenizer
from tests.support.peft_adapters import save_peft_adapter
from tests.support.triton_probes import (
    ClientPerThread,
    embed,
    http_status,
    settled_metric_total,
    peak_rss_kib,
    reset_peak_rss,
    server_ready,
    stub_pids,
)

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MAX_ADAPTERS = 3
MAX_BATCH_TOKENS = 2048
MAX_SEQ_LEN = 32
ATOL = 1e-5  # a row alone or in any batch: only the summation order may differ (fp32, CPU)
ALL_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# Six adapters for three device slots: every few requests evict one. Ranks and targets differ, so
# serving one adapter's rows with another's weights cannot pass.
ADAPTERS = {
    "tenant-0": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
    "tenant-1": {"r": 4, "lora_alpha": 8, "target_modules": ALL_TARGETS},
    "tenant-2": {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ["key", "output.dense"]},
    "tenant-3": {"r": 4, "lora_alpha": 16, "target_modules": ["intermediate.dense", "attention.output.dense"]},
    "tenant-4": {"r": 6, "lora_alpha": 6, "target_modules": ["query", "key", "value"]},
    "tenant-5": {"r": 3, "lora_alpha": 9, "target_modules": ["value", "intermediate.dense"]},
}
TENANTS = list(ADAPTERS)
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Grüße aus München — schöne Straße!",
    "東京は日本の首都です。",
    "emoji 🤖🚀 and accents: café naïve",
    "The quick brown fox jumps over the lazy dog.",
    "Où est la bibliothèque la plus proche ?",
    "Invoices are due within thirty days of receipt.",
    "Reset your password from the account settings page.",
    "The cat sat on the mat and watched the birds.",
    "Quarterly revenue grew by twelve percent.",
    "Please restart the router and try again.",
    "¿Dónde está la estación de tren?",
    "Photosynthesis converts light into chemical energy.",
    "He scored twice in the second half.",
]

# Bad requests of the load test and the error each must get (regex on the server's message).
BAD_KINDS = {
    "unknown-adapter": r"adapter 'tenant-9' not found: adapter_root has no folder of that name",
    "path-adapter": r"adapter id '\.\./tenant-0' is not valid: adapter ids are names, not paths",
    "empty-text": r"text 0 is empty",
    "invalid-utf8": r"text 0 is not valid UTF-8",
    "dimensions-0": r"dimensions=0 is below the minimum 1",
    "too-many-adapters": r"the request names 4 different adapters; at most max_adapters=3 fit on the device at once",
}
GOOD_KINDS = {"base": 0.20, "adapter": 0.35, "mixed": 0.10, "dimensions": 0.05}
KIND_WEIGHTS = {**GOOD_KINDS, **{kind: 0.05 for kind in BAD_KINDS}}
LOAD_REQUESTS = 2000
FORWARD_METRICS = ("loraembed_forward_passes_total", "loraembed_forward_tokens_total")
LOAD_CLIENTS = 16


# --- references -------------------------------------------------------------------------------------


class Reference:
    """Embeddings computed in this process with the server's settings (all six adapters resident)."""

    def __init__(self, adapter_root: Path):
        parameters = {
            "adapter_root": str(adapter_root),
            "max_adapters": str(len(ADAPTERS)),
            "max_batch_tokens": str(MAX_BATCH_TOKENS),
            "max_seq_len": str(MAX_SEQ_LEN),
            "normalize": "false",  # raw pooled rows; Matryoshka and normalization applied below
        }
        self.engine = EmbeddingEngine(ServingConfig.from_parameters(parameters, environ={}))
        self.tokenizer = TextTokenizer(bundled_model_path(), MAX_SEQ_LEN)
        self.pooled: dict[tuple[str, str], np.ndarray] = {}

    def pool(self, texts, adapter_ids) -> np.ndarray:
        """Raw pooled rows [n, 384] (one engine call for all), cached per (text, adapter)."""
        missing = [(t, a) for t, a in zip(texts, adapter_ids) if (t, a) not in self.pooled]
        if missing:
            ids, mask = self.tokenizer.encode([text for text, _ in missing])
            [rows] = self.engine.embed([EncoderRequest(ids, mask, adapter_ids=[a for _, a in missing])])
            assert not isinstance(rows, Exception), rows
            self.pooled.update(zip(missing, rows))
        return np.stack([self.pooled[(t, a)] for t, a in zip(texts, adapter_ids)])

    def expected(self, texts, adapter_ids=None, dimensions: int | None = None) -> np.ndarray:
        """What the server must answer: the first `dimensions` features, L2-normalized (the model's default)."""
        rows = self.pool(texts, adapter_ids or [""] * len(texts))[:, :dimensions]
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def adapter_sources(tmp_path_factory) -> Path:
    """Pristine copies of the six adapters, saved by peft over all-MiniLM-L6-v2."""
    sources = tmp_path_factory.mktemp("adapter-sources")
    for seed, (name, options) in enumerate(ADAPTERS.items(), start=600):
        save_peft_adapter(sources / name, bundled_model_path(), seed=seed, **options)
    return sources


@pytest.fixture(scope="module")
def adapter_root(adapter_sources, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter-root")
    for name in ADAPTERS:
        shutil.copytree(adapter_sources / name, root / name)
    return root


@pytest.fixture(scope="module")
def reference(adapter_root) -> Reference:
    reference = Reference(adapter_root)
    base = reference.expected(TEXTS)
    for tenant in TENANTS:  # each adapter really moves the embeddings, so a mix-up cannot pass
        assert np.abs(reference.expected(TEXTS, [tenant] * len(TEXTS)) - base).max() > 1e-2
    return reference


@pytest.fixture(scope="module")
def server(triton_server_factory, adapter_root):
    env = {
        "LORAEMBED_ADAPTER_ROOT": str(adapter_root),
        "LORAEMBED_MAX_ADAPTERS": str(MAX_ADAPTERS),
        "LORAEMBED_MAX_BATCH_TOKENS": str(MAX_BATCH_TOKENS),
        "LORAEMBED_MAX_SEQ_LEN": str(MAX_SEQ_LEN),
        # On the 2-core CI machine torch's second intra-op thread makes these small batches several
        # times slower (a strided [100, 384] x [384, 8] matmul: 6 ms instead of 0.08 ms).
        "OMP_NUM_THREADS": "1",
    }
    server = triton_server_factory(REPOSITORY, env, args=("--model-control-mode=explicit", "--load-model=*"))
    yield server
    # Should the stub test fail before its recovery, the dead encoder instance never unloads and a
    # graceful stop waits out Triton's 30 s exit timeout: stop it here, briefly. (The factory starts
    # a fresh server if this configuration is asked for again.)
    server.stop(timeout=5)


@pytest.fixture(scope="module")
def clients(server) -> ClientPerThread:
    return ClientPerThread(server.grpc_url)


def parity_requests():
    """One request per adapter (and the base model) over all texts: the parity probe."""
    return [(TEXTS, [adapter_id] * len(TEXTS)) for adapter_id in ["", *TENANTS]]


@pytest.fixture(scope="module")
def before_the_storm(server, clients, reference) -> list[np.ndarray]:
    """The server's answers to the parity probe before any test of this module has run."""
    answers = [embed(clients.get(), texts, adapter_ids) for texts, adapter_ids in parity_requests()]
    for (texts, adapter_ids), answer in zip(parity_requests(), answers):
        np.testing.assert_allclose(answer, reference.expected(texts, adapter_ids), rtol=0, atol=ATOL)
    return answers


# --- load ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRequest:
    kind: str
    texts: tuple
    adapter_ids: tuple | None  # None: no ADAPTER_ID input at all
    dimensions: int | None = None

    @property
    def error(self) -> str | None:
        """The error this request must get (a regex); None: it must succeed."""
        return BAD_KINDS.get(self.kind)


def plan_load(count: int, seed: int = 6) -> list[PlannedRequest]:
    rng = random.Random(seed)
    kinds = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()), k=count)
    plan = []
    for kind in kinds:
        text = rng.choice(TEXTS)
        if kind == "base":
            plan.append(PlannedRequest(kind, (text,), None))
        elif kind == "adapter":
            plan.append(PlannedRequest(kind, (text,), (rng.choice(TENANTS),)))
        elif kind == "mixed":  # several texts, each with its own adapter (or the base model), at most 3 adapters
            size = rng.randint(2, 5)
            choices = ["", *rng.sample(TENANTS, MAX_ADAPTERS)]
            plan.append(PlannedRequest(kind, tuple(rng.sample(TEXTS, size)), tuple(rng.choices(choices, k=size))))
        elif kind == "dimensions":
            plan.append(PlannedRequest(kind, (text,), (rng.choice(["", *TENANTS]),), rng.choice([16, 64, 128])))
        elif kind == "unknown-adapter":
            plan.append(PlannedRequest(kind, (text,), ("tenant-9",)))
        elif kind == "path-adapter":
            plan.append(PlannedRequest(kind, (text,), ("../tenant-0",)))
        elif kind == "empty-text":
            plan.append(PlannedRequest(kind, ("",), (rng.choice(TENANTS),)))
        elif kind == "invalid-utf8":
            plan.append(PlannedRequest(kind, (b"caf\xc3(" + text.encode()[:8],), None))
        elif kind == "too-many-adapters":
            plan.append(PlannedRequest(kind, tuple(rng.sample(TEXTS, 4)), tuple(rng.sample(TENANTS, 4))))
        elif kind == "dimensions-0":
            plan.append(PlannedRequest(kind, (text,), (rng.choice(TENANTS),), 0))
    return plan


def send(clients: ClientPerThread, request: PlannedRequest):
    """('ok', embeddings) or ('error', message); never raises."""
    parameters = None if request.dimensions is None else {"dimensions": request.dimensions}
    try:
        return "ok", embed(clients.get(), request.texts, request.adapter_ids, parameters)
    except InferenceServerException as error:
        return "error", str(error)
    except Exception as error:  # the transport failed: counted as lost
        return "transport", f"{type(error).__name__}: {error}"


def judge(reference: Reference, request: PlannedRequest, outcome) -> str:
    """'ok', or why not: 'lost' (a good request failed), 'incorrect', 'wrong-error', 'accepted-bad'."""
    status, value = outcome
    if request.error is not None:
        if status == "ok":
            return "accepted-bad"
        return "ok" if status == "error" and re.search(request.error, value) else "wrong-error"
    if status != "ok":
        return "lost"
    expected = reference.expected(list(request.texts), list(request.adapter_ids or [""] * len(request.texts)),
                                  request.dimensions)
    if value.shape != expected.shape or np.abs(value - expected).max() > ATOL:
        return "incorrect"
    return "ok"


def ensemble_counts(clients) -> tuple[int, int]:
    stats = clients.get().get_inference_statistics("embed").model_stats[0].inference_stats
    return stats.success.count, stats.fail.count


def settled(read, expected, timeout: float = 10.0):
    """`read()` once it returns `expected`, or its last value after `timeout` seconds: Triton records
    statistics after it has sent the response, so the last requests' may land a little later."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def test_concurrent_load_loses_nothing(server, clients, reference, before_the_storm):
    plan = plan_load(LOAD_REQUESTS)
    reference.pool(TEXTS * (1 + len(TENANTS)), [a for a in ["", *TENANTS] for _ in TEXTS])  # all references first
    successes_before, failures_before = ensemble_counts(clients)

    started = time.perf_counter()
    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        outcomes = list(pool.map(lambda request: send(clients, request), plan))
    seconds = time.perf_counter() - started

    verdicts = Counter(judge(reference, request, outcome) for request, outcome in zip(plan, outcomes))
    kinds = Counter(request.kind for request in plan)
    good = sum(count for kind, count in kinds.items() if kind in GOOD_KINDS)
    summary = (f"{len(outcomes)} requests ({good} good, {len(plan) - good} bad; {dict(kinds)}) from "
               f"{LOAD_CLIENTS} clients in {seconds:.1f} s: {dict(verdicts)}")
    print(summary)
    assert len(outcomes) == LOAD_REQUESTS
    assert verdicts == Counter({"ok": LOAD_REQUESTS}), summary
    assert all(kinds[kind] > 50 for kind in KIND_WEIGHTS)  # every kind was really exercised
    # The server counted the same: every good request a success, every bad one a failure (which
    # Triton 2.51 counts twice for an ensemble: once when its step fails, once for the ensemble).
    expected = (good, 2 * (len(plan) - good))
    counted = settled(lambda: tuple(now - before for now, before in
                                    zip(ensemble_counts(clients), (successes_before, failures_before))), expected)
    assert counted == expected
    assert server_ready(server)


# --- adapter files changing under a serving server --------------------------------------------------


@contextmanager
def steady_traffic(clients: ClientPerThread, reference: Reference, threads: int = 4):
    """Good requests (base model and tenant-0/tenant-1) from `threads` clients while the body runs;
    on exit, every one of them must have been answered correctly."""
    stop = threading.Event()
    verdicts: Counter = Counter()
    rng = random.Random(61)
    plan = [PlannedRequest("adapter", (rng.choice(TEXTS),), (rng.choice(["", "tenant-0", "tenant-1"]),))
            for _ in range(64)]

    def run(offset: int):
        index = offset
        while not stop.is_set():
            request = plan[index % len(plan)]
            verdicts[judge(reference, request, send(clients, request))] += 1
            index += threads

    workers = [threading.Thread(target=run, args=(offset,)) for offset in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield verdicts
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert set(verdicts) == {"ok"} and verdicts["ok"] >= threads, f"traffic during the fault: {dict(verdicts)}"


def embed_one(clients, adapter_id: str, texts=TEXTS[:4]) -> np.ndarray:
    return embed(clients.get(), texts, [adapter_id] * len(texts))


def expect_error(clients, adapter_id: str, message: str) -> None:
    with pytest.raises(InferenceServerException, match=message):
        embed_one(clients, adapter_id)


def test_adapter_folder_deleted_while_serving(adapter_root, adapter_sources, clients, reference):
    shutil.copytree(adapter_sources / "tenant-0", adapter_root / "live-delete")
    with steady_traffic(clients, reference):
        np.testing.assert_allclose(embed_one(clients, "live-delete"), reference.expected(TEXTS[:4], ["tenant-0"] * 4),
                                   rtol=0, atol=ATOL)
        shutil.rmtree(adapter_root / "live-delete")
        expect_error(clients, "live-delete", "adapter 'live-delete' not found: adapter_root has no folder of that name")
        shutil.copytree(adapter_sources / "tenant-2", adapter_root / "live-delete")  # back, with other weights
        np.testing.assert_allclose(embed_one(clients, "live-delete"), reference.expected(TEXTS[:4], ["tenant-2"] * 4),
                                   rtol=0, atol=ATOL)


def test_adapter_replaced_while_serving_serves_the_new_weights(adapter_root, adapter_sources, clients, reference):
    live = adapter_root / "live-swap"
    shutil.copytree(adapter_sources / "tenant-4", live)
    with steady_traffic(clients, reference):
        np.testing.assert_allclose(embed_one(clients, "live-swap"), reference.expected(TEXTS[:4], ["tenant-4"] * 4),
                                   rtol=0, atol=ATOL)
        # A deployment's atomic update: new files written beside the old ones, then renamed over them.
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(adapter_sources / "tenant-5" / name, live / f".{name}.new")
            os.replace(live / f".{name}.new", live / name)
        np.testing.assert_allclose(embed_one(clients, "live-swap"), reference.expected(TEXTS[:4], ["tenant-5"] * 4),
                                   rtol=0, atol=ATOL)
        # The same config, new weights only (same rank and targets): still noticed. The reference
        # reads the new adapter under its own id.
        save_peft_adapter(adapter_root / "tenant-5-reseeded", bundled_model_path(), seed=999, **ADAPTERS["tenant-5"])
        assert np.abs(reference.expected(TEXTS[:4], ["tenant-5-reseeded"] * 4)
                      - reference.expected(TEXTS[:4], ["tenant-5"] * 4)).max() > 1e-2
        shutil.copy(adapter_root / "tenant-5-reseeded" / "adapter_model.safetensors", live / ".weights.new")
        os.replace(live / ".weights.new", live / "adapter_model.safetensors")
        np.testing.assert_allclose(embed_one(clients, "live-swap"),
                                   reference.expected(TEXTS[:4], ["tenant-5-reseeded"] * 4), rtol=0, atol=ATOL)


def test_adapter_corrupted_while_serving(adapter_root, adapter_sources, clients, reference):
    live = adapter_root / "live-corrupt"
    shutil.copytree(adapter_sources / "tenant-3", live)
    expected = reference.expected(TEXTS[:4], ["tenant-3"] * 4)
    weights = (live / "adapter_model.safetensors").read_bytes()
    config = (live / "adapter_config.json").read_text()
    with steady_traffic(clients, reference):
        np.testing.assert_allclose(embed_one(clients, "live-corrupt"), expected, rtol=0, atol=ATOL)
        (live / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 3])  # a torn copy
        expect_error(clients, "live-corrupt", "adapter 'live-corrupt' cannot be served: adapter_model.safetensors "
                                              "is not a valid safetensors file")
        (live / "adapter_model.safetensors").write_bytes(weights)
        np.testing.assert_allclose(embed_one(clients, "live-corrupt"), expected, rtol=0, atol=ATOL)
        (live / "adapter_config.json").write_text(config[: len(config) // 2])
        expect_error(clients, "live-corrupt", "adapter 'live-corrupt' cannot be served: adapter_config.json is not "
                                              "valid JSON")
        (live / "adapter_config.json").write_text(config)
        np.testing.assert_allclose(embed_one(clients, "live-corrupt"), expected, rtol=0, atol=ATOL)


# Adapter folders whose load fails inside the engine, and each one's error. Before the fix in
# lora/registry.py, the first two raised RuntimeError / TypeError out of the engine, which failed
# every request of the Triton batch.
FAILING_LOADS = {
    "symlink-loop": r"adapter 'symlink-loop' cannot be resolved \(a symlink loop or an unreadable path\)",
    "odd-config": r"adapter 'odd-config' cannot be served: reading it failed \(TypeError: ",
    "weights-dir": r"adapter 'weights-dir' cannot be served: no weights: neither adapter_model.safetensors nor",
}


def test_adapter_loads_that_fail_mid_batch_fail_only_their_requests(server, adapter_root, adapter_sources, clients,
                                                                    reference):
    (adapter_root / "symlink-loop").symlink_to(adapter_root / "symlink-loop")
    shutil.copytree(adapter_sources / "tenant-1", adapter_root / "odd-config")
    config = json.loads((adapter_root / "odd-config" / "adapter_config.json").read_text())
    # layers_to_transform must be an int or a list; a string makes PEFT's matching rule raise TypeError.
    (adapter_root / "odd-config" / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": "0-3"}))
    (adapter_root / "weights-dir").mkdir()
    shutil.copy(adapter_sources / "tenant-1" / "adapter_config.json", adapter_root / "weights-dir")
    (adapter_root / "weights-dir" / "adapter_model.safetensors").mkdir()  # a directory where a file belongs

    rng = random.Random(62)
    failing = list(FAILING_LOADS)
    # Every third request names a failing adapter, the others the base model or a good adapter.
    plan = [PlannedRequest("adapter", (rng.choice(TEXTS),),
                           (failing[i // 3 % 3] if i % 3 == 0 else rng.choice(["", "tenant-1", "tenant-5"]),))
            for i in range(3 * 48)]

    def counts():
        stats = clients.get().get_inference_statistics("encoder").model_stats[0]
        return stats.execution_count, stats.inference_count

    executions_before, inferences_before = counts()
    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(lambda request: send(clients, request), plan))
    inferences = settled(lambda: counts()[1] - inferences_before, len(plan))
    executions = counts()[0] - executions_before
    assert inferences == len(plan) and executions < inferences  # requests shared executions

    for request, (status, value) in zip(plan, outcomes):
        adapter_id = request.adapter_ids[0]
        if adapter_id in FAILING_LOADS:
            assert status == "error" and re.search(FAILING_LOADS[adapter_id], value), (adapter_id, value)
        else:
            assert judge(reference, request, (status, value)) == "ok", (adapter_id, status, value)
    assert server_ready(server)


# --- one very large request ---------------------------------------------------------------------------


def long_texts(count: int) -> list[str]:
    """`count` distinct texts of at least 512 tokens each (their first words differ)."""
    words = "time year people way day man thing woman life child world school state family student".split()
    rng = random.Random(63)
    texts = [f"document {index}: " + " ".join(rng.choice(words) for _ in range(520)) for index in range(count)]
    untruncated = Tokenizer.from_file(str(bundled_model_path() / "tokenizer.json"))
    untruncated.no_truncation()  # the file itself truncates at 128
    assert min(len(encoding.ids) for encoding in untruncated.encode_batch(texts)) >= 512
    return texts


def test_500_long_texts_are_split_by_max_batch_tokens_with_bounded_memory(server, clients, reference):
    texts = long_texts(500)
    [encoder_stub] = stub_pids(server, "encoder")
    embed(clients.get(), texts[:8])  # warm: allocator pools of an ordinary batch
    passes_before, tokens_before = (settled_metric_total(server, name) for name in FORWARD_METRICS)
    rss_before = reset_peak_rss(encoder_stub)
    started = time.perf_counter()
    result = embed(clients.get(), texts)  # truncated to max_seq_len: [500, 32] tokens reach the encoder
    seconds = time.perf_counter() - started
    growth_mib = (peak_rss_kib(encoder_stub) - rss_before) / 1024
    passes, tokens = (settled_metric_total(server, name) - before
                      for name, before in zip(FORWARD_METRICS, (passes_before, tokens_before)))

    print(f"500 texts x {MAX_SEQ_LEN} tokens: {tokens:.0f} tokens in {passes:.0f} forward passes of <= "
          f"{MAX_BATCH_TOKENS} tokens, {seconds:.1f} s; the encoder's peak RSS grew by {growth_mib:.0f} MiB")
    assert result.shape == (500, 384)
    sample = [0, 1, 137, 250, 498, 499]
    np.testing.assert_allclose(result[sample], reference.expected([texts[i] for i in sample]), rtol=0, atol=ATOL)
    assert tokens == 500 * MAX_SEQ_LEN
    assert passes >= tokens / MAX_BATCH_TOKENS and tokens / passes <= MAX_BATCH_TOKENS
    # Measured on the CI machine: the peak grows by 16-100 MiB in passes of 2048 tokens, and by
    # ~480 MiB with max_batch_tokens=16384 (one pass holding [16000, 1536] fp32 activations).
    assert growth_mib < 200
    assert server_ready(server)


# --- parity after all of it -----------------------------------------------------------------------------


def test_parity_after_the_storm(server, clients, before_the_storm):
    for (texts, adapter_ids), before in zip(parity_requests(), before_the_storm):
        np.testing.assert_allclose(embed(clients.get(), texts, adapter_ids), before, rtol=0, atol=ATOL)
    assert server_ready(server)


# --- the encoder's stub process killed --------------------------------------------------------------------


def test_killed_encoder_stub_fails_requests_until_the_model_is_reloaded(server, clients, reference, before_the_storm):
    """What Triton 2.51 does when the stub dies: the request in flight and every later encoder request
    fail with INTERNAL "Stub process 'encoder_0_0' is not healthy.", the stub is not restarted, and
    /v2/health/ready and the model's ready endpoint keep answering 200. With explicit model control,
    unloading and loading the model starts a new stub (a load alone is a no-op: the files did not
    change); otherwise only a restart of the server recovers."""
    [stub] = stub_pids(server, "encoder")
    in_flight = {}

    def long_request():
        in_flight["outcome"] = send(clients, PlannedRequest("base", tuple(TEXTS * 20), None))

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.3)  # the encoder is busy with it
    os.kill(stub, signal.SIGKILL)
    worker.join()
    assert in_flight["outcome"][0] == "error", "a request in flight when the stub died must fail"
    assert re.search(r"Stub process 'encoder_0_0' is not healthy", in_flight["outcome"][1])

    for _ in range(3):  # not restarted: it keeps failing, while readiness says all is well
        with pytest.raises(InferenceServerException, match=r"Stub process 'encoder_0_0' is not healthy"):
            embed(clients.get(), TEXTS[:2])
        time.sleep(0.5)
    assert stub_pids(server, "encoder") == []
    assert server_ready(server)
    assert http_status(server, "/v2/models/encoder/ready") == 200
    assert http_status(server, "/v2/repository/models/encoder/load", method="POST") == 200
    assert stub_pids(server, "encoder") == []  # unchanged files: nothing was reloaded

    # Recovery (needs --model-control-mode=explicit): unload, then load; the ensemble follows.
    assert http_status(server, "/v2/repository/models/encoder/unload", method="POST") == 200
    assert http_status(server, "/v2/repository/models/encoder/load", method="POST") == 200
    assert len(stub_pids(server, "encoder")) == 1
    for (texts, adapter_ids), before in zip(parity_requests(), before_the_storm):
        np.testing.assert_allclose(embed(clients.get(), texts, adapter_ids), before, rtol=0, atol=ATOL)
    assert server_ready(server)
