"""Embed texts with the `embed` ensemble over HTTP/REST and print a cosine-similarity table.

    python client_examples/http_client.py "A cat sits on the mat." "A kitten lies on a rug." "Stocks fell."
"""

import argparse
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from embedding_table import parse_table_client_args, print_similarity_table


def parse_args(argv=None) -> argparse.Namespace:
    return parse_table_client_args(__doc__, "HTTP", "localhost:8000", argv)


def embed(client: httpclient.InferenceServerClient, args: argparse.Namespace) -> np.ndarray:
    """[n, dims] float32 embeddings of args.texts; the adapter id is sent once per text."""
    texts = np.array([[text.encode("utf-8")] for text in args.texts], dtype=object)  # [n, 1]
    inputs = [httpclient.InferInput("TEXT", list(texts.shape), "BYTES")]
    inputs[0].set_data_from_numpy(texts)
    if args.adapter:
        adapter_ids = np.full(texts.shape, args.adapter.encode("utf-8"), dtype=object)  # [n, 1]
        inputs.append(httpclient.InferInput("ADAPTER_ID", list(adapter_ids.shape), "BYTES"))
        inputs[1].set_data_from_numpy(adapter_ids)
    # Sent as JSON `parameters`; an option not given keeps the server's default.
    parameters = {"normalize": args.normalize, "dimensions": args.dimensions}
    result = client.infer(
        "embed",
        inputs,
        outputs=[httpclient.InferRequestedOutput("EMBEDDING", binary_data=True)],
        parameters={name: value for name, value in parameters.items() if value is not None},
    )
    return result.as_numpy("EMBEDDING")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        embeddings = embed(httpclient.InferenceServerClient(args.url), args)
    except (InferenceServerException, OSError) as error:  # OSError: connection refused, reset, ...
        sys.exit(f"error: {error}")
    print_similarity_table(args.texts, embeddings)


if __name__ == "__main__":
    main()
