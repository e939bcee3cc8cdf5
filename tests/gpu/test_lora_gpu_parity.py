"""On the GPU, in bf16: one packed batch mixing base rows and four adapters of different ranks
(through the Triton shrink and the GEMMs that add the expand in their epilogue)
matches `peft` in fp32, cosine >= 0.999; so does a batch of one adapter only (merged per linear)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loraembed.encoder as encoder_module
import loraembed.lora.layers as lora_layers
from loraembed.config import ServingConfig
from loraembed.engine import EmbeddingEngine, EncoderRequest
from tests.support.peft_adapters import last_hidden_state, pooled, save_peft_adapter
from tests.support.token_rows import xlmr_rows

pytestmark = pytest.mark.gpu

ALL_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
ADAPTERS = {
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "r16-all-rslora": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=ALL_TARGETS),
    "r64-mlp": dict(r=64, lora_alpha=32, target_modules=["intermediate.dense", "output.dense"]),
    # attention.output.dense at rank capacity 32, with several adapters in each 128-row tile
    "r32-attn-out": dict(r=32, lora_alpha=64, target_modules=["attention.output.dense"]),
}


@pytest.fixture(scope="module")
def adapters(xlmr_base_folder, tmp_path_factory):
    """Adapters saved by peft, and each adapter's fp32 PeftModel (kept on the CPU until used)."""
    root = tmp_path_factory.mktemp("adapters")
    models = {}
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        model = save_peft_adapter(root / name, xlmr_base_folder, seed=seed, **options)
        with torch.no_grad():  # peft's random B is large next to these weights; keep outputs meaningful
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.mul_(0.2)
        model.save_pretrained(root / name)
        models[name] = model
    return root, models


def reference_rows(model, ids, mask, adapter: bool) -> np.ndarray:
    model = model.cuda()
    hidden = last_hidden_state_cuda(model, ids, mask, adapter)
    model.cpu()
    return pooled(hidden.cpu(), mask, "mean")


def last_hidden_state_cuda(model, ids, mask, adapter):
    inputs = {"input_ids": torch.from_numpy(ids).cuda(), "attention_mask": torch.from_numpy(mask).cuda()}
    with torch.no_grad():
        if adapter:
            return model(**inputs, output_hidden_states=True).hidden_states[-1]
        with model.disable_adapter():
            return model(**inputs, output_hidden_states=True).hidden_states[-1]


def make_lora_engine(xlmr_base_folder, root, graph_tokens: int = 16384) -> EmbeddingEngine:
    return EmbeddingEngine(
        ServingConfig.from_parameters(
            {"model": str(xlmr_base_folder), "adapter_root": str(root), "pooling": "mean", "dtype": "bfloat16",
             "cuda_graph_max_tokens": str(graph_tokens)},
            environ={},
        ),
        "cuda",
    )


# Both ways a GPU batch runs: a CUDA graph replay (the default for batches up to 16k tokens) and
# the eager forward.
GRAPHS = pytest.mark.parametrize("graph_tokens", [16384, 0], ids=["graphs", "eager"])


def random_rows(rows: int, seed: int, shortest: int = 5, longest: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return xlmr_rows(rng.integers(shortest, longest, size=rows), rng)


def not_expected(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"the GPU run took {what}")
    return fail


@GRAPHS
# Short rows put every adapter into each 128-token tile: several MMAs per tile in the GEMM's expand.
@pytest.mark.parametrize("row_count, shortest, longest", [(24, 5, 300), (48, 4, 16)], ids=["rows", "short-rows"])
# The engine fuses a linear's expand into its GEMM from one output tile per SM on: these small
# batches then take the separate expand on some or all linears. "fused": every linear fuses.
@pytest.mark.parametrize("fused_everywhere", [True, False], ids=["fused", "engine-default"])
def test_mixed_adapter_batch_matches_peft_in_bf16(xlmr_base_folder, adapters, monkeypatch, graph_tokens,
                                                  row_count, shortest, longest, fused_everywhere):
    root, models = adapters
    engine = make_lora_engine(xlmr_base_folder, root, graph_tokens)
    if fused_everywhere:
        engine.adapters.layers.batch_state.fused_gemm_min_tiles = 0
    monkeypatch.setattr(lora_layers, "apply_segmented_lora", not_expected("the reference segmented LoRA"))
    fused_calls = []
    lora_gemm = lora_layers.lora_gemm

    def counted_lora_gemm(*args):
        fused_calls.append(args[3])  # the activation
        return lora_gemm(*args)

    monkeypatch.setattr(lora_layers, "lora_gemm", counted_lora_gemm)
    if fused_everywhere:
        monkeypatch.setattr(encoder_module, "add_lora_activation", not_expected("the GELU + LoRA pass"))
    names = ["", *ADAPTERS]
    adapter_ids = [names[i % len(names)] for i in range(row_count)]
    ids, mask = random_rows(row_count, 0, shortest, longest)
    ours = engine.embed([EncoderRequest(ids, mask, adapter_ids, {"normalize": False})])[0]
    # The expand of every linear the rule fuses went into its GEMM's epilogue (with
    # fused_everywhere, every linear's, intermediate.dense's before the GELU).
    # (A graph's warm-up and capture run the forward three times.)
    layers = engine.model.config.num_hidden_layers
    tokens = int(mask.sum())
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    fused_linears = 4 if fused_everywhere else sum(  # Q/K/V, attention.output.dense, intermediate, output.dense
        -(-tokens // 128) * tiles_per_row_block >= programs for tiles_per_row_block in (9, 3, 12, 3))
    if graph_tokens:  # a replay runs on the bucket's tokens, more than the batch's
        assert len(fused_calls) % layers == 0 and len(fused_calls) >= fused_linears * layers, fused_calls
    else:
        assert len(fused_calls) == fused_linears * layers, (fused_linears, fused_calls)
    if fused_everywhere:
        assert any(activation.startswith("gelu") for activation in fused_calls), fused_calls
    plans = [key[3] for key in engine.graphed.graphs] if engine.graphed is not None else []
    assert plans == (["fused tables"] if graph_tokens else []), plans

    any_model = next(iter(models.values()))
    for name in names:
        rows = [i for i, a in enumerate(adapter_ids) if a == name]
        model = models[name] if name else any_model
        reference = reference_rows(model, ids[rows], mask[rows], adapter=bool(name))
        got = ours[rows]
        cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        print(f"adapter {name or '(base)'}: min cosine {cosine.min():.6f}")
        assert cosine.min() >= 0.999
        if name:  # the adapter moves the embedding further than the tolerance, or the check is vacuous
            base = reference_rows(any_model, ids[rows], mask[rows], adapter=False)
            moved = (base * reference).sum(1) / np.linalg.norm(base, axis=1) / np.linalg.norm(reference, axis=1)
            print(f"adapter {name}: cosine to the base model {moved.max():.6f}")
            assert moved.max() < 0.999


@GRAPHS
@pytest.mark.parametrize("name", ["r16-all-rslora", "r64-mlp"])
def test_single_adapter_batch_is_merged_and_matches_peft_in_bf16(xlmr_base_folder, adapters, monkeypatch, name, graph_tokens):
    """Every row uses one adapter: W + B A per linear, one GEMM each, no shrink or expand."""
    root, models = adapters
    engine = make_lora_engine(xlmr_base_folder, root, graph_tokens)
    monkeypatch.setattr(lora_layers, "apply_segmented_lora", not_expected("the reference segmented LoRA"))
    monkeypatch.setattr(lora_layers, "lora_shrink", not_expected("the shrink"))
    ids, mask = random_rows(12, seed=1)
    ours = engine.embed([EncoderRequest(ids, mask, [name], {"normalize": False})])[0]
    reference = reference_rows(models[name], ids, mask, adapter=True)
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"adapter {name} merged: min cosine {cosine.min():.6f}")
    assert cosine.min() >= 0.999
    assert (engine.graphed is not None and [key[3] for key in engine.graphed.graphs] == ["merged"]) == bool(graph_tokens)


def test_adapter_graph_replays_equal_the_eager_engine_across_buckets_and_buffer_growth(xlmr_base_folder, adapters):
    """Merged and block-table graphs, replayed with other slots, lengths and segment layouts than
    they were captured with, equal the eager engine; an adapter that grows the LoRA buffers drops
    the graphs that read the old ones, and the batches that replayed them still come out right."""
    root, _ = adapters
    graphed = make_lora_engine(xlmr_base_folder, root)
    eager = make_lora_engine(xlmr_base_folder, root, graph_tokens=0)
    rng = np.random.default_rng(7)

    def check(lengths, adapter_ids):
        ids, mask = xlmr_rows(lengths, rng)
        request = [EncoderRequest(ids, mask, adapter_ids, {"normalize": False})]
        ours, reference = graphed.embed(request)[0], eager.embed(request)[0]
        cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() >= 0.9999, (lengths, adapter_ids, cosine.min())

    names = ["", "r4-qv", "r16-all-rslora"]
    rounds = [
        ([16], ["r4-qv"]),  # merged
        ([16], ["r16-all-rslora"]),  # the same merged graph, another slot
        ([16, 40, 7], ["", "r4-qv", "r16-all-rslora"]),  # tables
        ([9, 30, 12], ["r16-all-rslora", "", "r16-all-rslora"]),  # the same graph, another layout
        (rng.integers(4, 200, 60).tolist(), [names[i % 3] for i in range(60)]),
        ([300] * 10, ["r16-all-rslora"]),
    ]
    for lengths, adapter_ids in rounds * 2:
        check(lengths, adapter_ids)
    plans = [key[3] for key in graphed.graphed.graphs]
    assert "merged" in plans and "fused tables" in plans, plans
    generation = graphed.adapters.layers.buffer_generation
    check([50, 60, 70], ["r64-mlp", "r16-all-rslora", ""])  # loads r64-mlp: rank 64 > 16 in the MLP linears
    assert graphed.adapters.layers.buffer_generation > generation
    # Only the graph just captured reads LoRA buffers: the others were dropped.
    assert [key[3] for key in graphed.graphed.graphs if key[3] != "base"] == ["fused tables"]
    for lengths, adapter_ids in rounds:
        check(lengths, adapter_ids)


def test_warm_up_captures_the_graphs_of_each_batch_kind_and_changes_no_answer(xlmr_base_folder, adapters):
    """What the encoder model runs before Triton calls it ready (`warmup=auto` on a GPU): graphs for a
    query and a full batch, of the base model, of two adapters (the fused tables) and of one (merged);
    the next query of one adapter replays a graph it captured and equals the eager engine."""
    root, _ = adapters
    engine = EmbeddingEngine(
        ServingConfig.from_parameters(
            {"model": str(xlmr_base_folder), "adapter_root": str(root), "pooling": "mean", "dtype": "bfloat16",
             "adapter_preload": "r4-qv,r16-all-rslora"},
            environ={},
        ),
        "cuda",
    )
    assert engine.warmup_enabled
    engine.warm_up()
    plans = sorted((key[0], key[3]) for key in engine.graphed.graphs)
    assert plans == [(64, "base"), (64, "fused tables"), (64, "merged"), (16384, "base"), (16384, "fused tables")], plans
    metrics = engine.metrics_snapshot()
    assert (metrics.forward_passes, metrics.graph_replays, metrics.graph_captures) == (0, 0, 5)
    eager = make_lora_engine(xlmr_base_folder, root, graph_tokens=0)
    ids, mask = xlmr_rows([16], np.random.default_rng(3))
    request = [EncoderRequest(ids, mask, ["r16-all-rslora"], {"normalize": False})]
    ours, reference = engine.embed(request)[0], eager.embed(request)[0]
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    metrics = engine.metrics_snapshot()
    assert (metrics.forward_passes, metrics.graph_replays, metrics.graph_captures) == (1, 1, 5)
