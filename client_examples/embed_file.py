"""Embed every non-empty line of a text file over gRPC, many batches in flight, into an .npy file.

    python client_examples/embed_file.py corpus.txt --output corpus.npy --batch-size 32 --concurrency 8

Row i of the output [n_texts, dims] float32 is the i-th non-empty line. If any batch fails, its
line numbers and the server's message are printed, nothing is written and the exit status is 1.
"""

import argparse
import queue
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from grpc_client import build_inputs, request_parameters


def read_texts(path: Path) -> tuple[list[str], list[int]]:
    """The non-empty lines of `path` and their 1-based line numbers."""
    numbered = [(number, line) for number, line in enumerate(path.read_text("utf-8").splitlines(), 1) if line.strip()]
    return [line for _, line in numbered], [number for number, _ in numbered]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="UTF-8 text file, one text per line (empty lines are skipped)")
    parser.add_argument("--output", type=Path, help="output .npy (default: the input path with .npy)")
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    parser.add_argument("--adapter", metavar="ID", help="LoRA adapter id for every text (default: the base model)")
    parser.add_argument("--dimensions", type=int, metavar="N", help="keep the first N dimensions (Matryoshka)")
    parser.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction,
        help="L2-normalize the embeddings (default: the server's setting)",
    )
    args = parser.parse_args(argv)
    if not args.input.is_file():
        parser.error(f"{args.input} is not a file")
    if not 1 <= args.batch_size <= 1024 or args.concurrency < 1:
        parser.error("--batch-size must be in 1..1024 (the model's max_batch_size) and --concurrency at least 1")
    return args


def embed_batches(client, texts: list[str], args: argparse.Namespace) -> tuple[dict, dict]:
    """Send every batch, at most args.concurrency in flight. Returns ({start: [b, dims] array},
    {start: error message}), keyed by the index of the batch's first text."""
    # async_infer calls back on a gRPC thread: the callback only queues, this thread does the rest.
    finished = queue.Queue()  # (start, InferResult or None, InferenceServerException or None)
    results, errors = {}, {}
    starts = range(0, len(texts), args.batch_size)
    parameters = request_parameters(args.normalize, args.dimensions)
    with tqdm(total=len(texts), unit="text") as progress:

        def collect_one():
            start, result, error = finished.get()
            if error is None:
                results[start] = result.as_numpy("EMBEDDING")
            else:
                errors[start] = error.message()
            progress.update(min(args.batch_size, len(texts) - start))

        for sent, start in enumerate(starts):
            if sent >= args.concurrency:
                collect_one()  # wait for a free slot
            client.async_infer(
                "embed",
                build_inputs(texts[start : start + args.batch_size], args.adapter),
                callback=lambda result, error, start=start: finished.put((start, result, error)),
                outputs=[grpcclient.InferRequestedOutput("EMBEDDING")],
                parameters=parameters,
            )
        for _ in range(min(args.concurrency, len(starts))):
            collect_one()
    return results, errors


def main(argv=None) -> None:
    args = parse_args(argv)
    texts, line_numbers = read_texts(args.input)
    if not texts:
        sys.exit(f"error: {args.input} has no non-empty lines")
    client = grpcclient.InferenceServerClient(args.url)
    try:  # fail once, here, rather than once per batch
        ready = client.is_model_ready("embed")
    except InferenceServerException as error:
        sys.exit(f"error: {error}")
    if not ready:
        sys.exit(f"error: model 'embed' is not ready at {args.url}")

    begin = time.perf_counter()
    results, errors = embed_batches(client, texts, args)
    elapsed = time.perf_counter() - begin
    client.close()

    if errors:
        n_batches = len(results) + len(errors)
        print(f"{len(errors)} of {n_batches} batches failed; nothing written:", file=sys.stderr)
        for start in sorted(errors)[:20]:
            last = min(start + args.batch_size, len(texts)) - 1
            print(f"lines {line_numbers[start]}-{line_numbers[last]}: {errors[start]}", file=sys.stderr)
        if len(errors) > 20:
            print(f"... and {len(errors) - 20} more", file=sys.stderr)
        sys.exit(1)
    embeddings = np.concatenate([results[start] for start in sorted(results)])  # [n_texts, dims], input order
    output = args.output or args.input.with_suffix(".npy")
    np.save(output, embeddings)
    print(f"wrote {output} {list(embeddings.shape)} float32")
    print(f"{len(texts)} texts in {elapsed:.1f} s: {len(texts) / elapsed:.1f} texts/s")


if __name__ == "__main__":
    main()
