"""Printing embeddings as a shape line and a cosine-similarity table; shared by grpc_client.py and
http_client.py."""

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
