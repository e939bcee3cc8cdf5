"""Shared fixtures of the GPU tests: a random XLM-R base checkpoint (12 x 768, pad_token_id 1)."""

from __future__ import annotations

import pytest
import torch

from tests.support.checkpoints import xlmr_tokenizer


@pytest.fixture(scope="session")
def xlmr_base_folder(tmp_path_factory):
    from transformers import XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
    )
    folder = tmp_path_factory.mktemp("xlmr-base")
    XLMRobertaModel(config).save_pretrained(folder)
    xlmr_tokenizer(vocab_size=250).save(str(folder / "tokenizer.json"))
    return folder
