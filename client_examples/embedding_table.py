"""What grpc_client.py and http_client.py share: their command line, and printing embeddings as a
shape line and a cosine-similarity table."""

import argparse

import numpy as np

LABEL_WIDTH = 30


def _label(text: str) -> str:
    text = " ".join(text.split())  # newlines and tabs would break the table
    return text if len(text) <= LABEL_WIDTH else text[: LABEL_WIDTH - 1] + "…"


def cosine_similarity(embeddings: np.ndarray) -> np.ndarray:
    """[n, n] cosine similarities of the rows of `embeddings` [n, d], normalized or not."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)  # [n, 1]
    unit = embeddings / np.maximum(norms, 1e-12)
    return unit @ unit.T


def print_similarity_table(texts: list[str], embeddings: np.ndarray) -> None:
    """Print the shape, the range of row norms and the cosine similarity of every pair of texts."""
    norms = np.linalg.norm(embeddings, axis=1)
    print(f"EMBEDDING {embeddings.dtype} {list(embeddings.shape)}, norms {norms.min():.4f}..{norms.max():.4f}\n")
    labels = [_label(text) for text in texts]
    row_width = max(map(len, labels))
    col_widths = [max(len(label), 6) for label in labels]
    print(" " * row_width + "".join("  " + label.rjust(width) for label, width in zip(labels, col_widths)))
    for label, row in zip(labels, cosine_similarity(embeddings)):
        print(label.ljust(row_width) + "".join(f"  {value:{width}.3f}" for value, width in zip(row, col_widths)))


def parse_table_client_args(description: str, protocol: str, default_url: str, argv=None) -> argparse.Namespace:
    """The command line of the two table clients; only the endpoint differs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed (at most 1024)")
    parser.add_argument("--url", default=default_url, help=f"Triton {protocol} endpoint (default: %(default)s)")
    parser.add_argument("--adapter", metavar="ID", help="LoRA adapter id for every text (default: the base model)")
    parser.add_argument("--dimensions", type=int, metavar="N", help="keep the first N dimensions (Matryoshka)")
    parser.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction,
        help="L2-normalize the embeddings (default: the server's setting)",
    )
    return parser.parse_args(argv)
