#!/usr/bin/env bash
# A first look at serving speed on the GPU host (issue 5 will grow this into serve_bench.sh):
# tritonserver with model_repository/ on a random-weight XLM-R base, then perf_analyzer over gRPC
# against `embed` with single 16-token-ish query texts, concurrency 1..64.
# Needs the server bundle: source scripts/gpu_host_env.sh first. Writes under ${OUT:-/tmp/serve}.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/serve}; mkdir -p "$OUT"
MODEL=$(mktemp -d)/xlmr-base
"${HOST_PYTHON:-python3}" - "$MODEL" <<'PY'
import sys, torch
sys.path.insert(0, ".")
from pathlib import Path
from transformers import XLMRobertaConfig, XLMRobertaModel
from tests.support.checkpoints import xlmr_tokenizer
torch.manual_seed(0)
config = XLMRobertaConfig(vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
XLMRobertaModel(config).save_pretrained(sys.argv[1])
xlmr_tokenizer(vocab_size=250).save(str(Path(sys.argv[1]) / "tokenizer.json"))
PY
# WORKLOAD=queries (default): one short text per request; WORKLOAD=passages: 32 texts of ~120
# tokens per request.
WORKLOAD=${WORKLOAD:-queries}
"${HOST_PYTHON:-python3}" - "$OUT/input.json" "$WORKLOAD" "$MODEL/tokenizer.json" <<'PY'
import json, sys
from tokenizers import Tokenizer
out, workload, tokenizer_file = sys.argv[1:]
if workload == "queries":
    texts = [["the text is of the world and hello"], ["a query about the world of text"]]
else:
    words = "the text is of the world and hello a query about".split()
    passage = lambda seed: " ".join(words[(seed + i * 7) % len(words)] for i in range(60))
    texts = [[passage(seed)] for seed in range(128)]  # perf_analyzer -b 32 sends 32 entries per request
    tokens = sum(len(e.ids) for e in Tokenizer.from_file(tokenizer_file).encode_batch([t[0] for t in texts])) / 128
    print(f"passages: 32 texts of {tokens:.0f} tokens per request")
json.dump({"data": [{"TEXT": {"content": t, "shape": [1]}} for t in texts]}, open(out, "w"))
PY
LORAEMBED_MODEL=$MODEL LORAEMBED_POOLING=mean tritonserver --model-repository="$ROOT/model_repository" \
  --backend-directory="$TRITON_BACKENDS" --disable-auto-complete-config --http-port 18000 --grpc-port 18001 \
  --metrics-port 18002 --backend-config=python,shm-default-byte-size=16777216 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf localhost:18000/v2/health/ready >/dev/null && break; sleep 1; done
curl -sf localhost:18000/v2/health/ready >/dev/null || { tail -30 "$OUT/server.log"; exit 1; }
BUNDLE=$(cd "$TRITON_BACKENDS/../../.." && pwd)  # where install.sh unpacked perf_analyzer
LD_LIBRARY_PATH=$BUNDLE/perf/lib:${LD_LIBRARY_PATH:-} "$BUNDLE/perf/perf_analyzer" -m embed -u localhost:18001 -i grpc -b "$([ "$WORKLOAD" = passages ] && echo 32 || echo 1)" --input-data "$OUT/input.json" \
  --concurrency-range "${CONCURRENCY:-1:64:2}" --measurement-interval 3000 -f "$OUT/embed_$WORKLOAD.csv" > "$OUT/perf.log" 2>&1 || tail -20 "$OUT/perf.log"
echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader)   date: $(date -I)"
grep -E "^Concurrency:" "$OUT/perf.log" || true
head -12 "$OUT/embed_$WORKLOAD.csv" 2>/dev/null | cut -d, -f1-2,5-7,10-13 || true
