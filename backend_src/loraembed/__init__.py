"""loraembed: a packed (varlen) embedding encoder with per-request LoRA adapters.

Plain PyTorch and `tokenizers`; never imports Triton. The Triton `model.py` files are thin
adapters around `EmbeddingEngine` and `TextTokenizer`.
"""
