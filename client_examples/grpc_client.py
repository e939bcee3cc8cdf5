"""Embed texts with the `embed` ensemble over gRPC and print a cosine-similarity table.

    python client_examples/grpc_client.py "A cat sits on the mat." "A kitten lies on a rug." "Stocks fell."
"""

import argparse
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from embedding_table import parse_table_client_args, print_similarity_table


def build_inputs(texts: list[str], adapter: str | None = None) -> list[grpcclient.InferInput]:
    """TEXT [n, 1] and, with an adapter, ADAPTER_ID [n, 1]: the same id for every text."""
    columns = {"TEXT": texts}
    if adapter:
        columns["ADAPTER_ID"] = [adapter] * len(texts)
    inputs = []
    for name, values in columns.items():
        array = np.array([[value.encode("utf-8")] for value in values], dtype=object)  # [n, 1]
        inputs.append(grpcclient.InferInput(name, list(array.shape), "BYTES"))
        inputs[-1].set_data_from_numpy(array)
    return inputs


def request_parameters(normalize: bool | None, dimensions: int | None) -> dict:
    """The request parameters of `embed`; an option left as None keeps the server's default."""
    parameters = {"normalize": normalize, "dimensions": dimensions}
    return {name: value for name, value in parameters.items() if value is not None}


def parse_args(argv=None) -> argparse.Namespace:
    return parse_table_client_args(__doc__, "gRPC", "localhost:8001", argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    client = grpcclient.InferenceServerClient(args.url)
    try:
        result = client.infer(
            "embed",
            build_inputs(args.texts, args.adapter),
            outputs=[grpcclient.InferRequestedOutput("EMBEDDING")],
            parameters=request_parameters(args.normalize, args.dimensions),
        )
    except InferenceServerException as error:
        sys.exit(f"error: {error}")
    print_similarity_table(args.texts, result.as_numpy("EMBEDDING"))


if __name__ == "__main__":
    main()
