"""PEFT adapters with random non-zero factors, saved by `peft` itself, and their reference outputs.

`init_lora_weights=False` keeps nn.Linear's random init for both A and B (PEFT's default zeroes B,
which would make every adapter equal the base model and every parity test pass vacuously).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def make_peft_model(base_path: Path, *, masked_lm: bool = False, seed: int = 0, **lora_options):
    """A `PeftModel` (eval, fp32, eager attention) over HF's model of `base_path` with random LoRA.

    `masked_lm` wraps the *ForMaskedLM class, so the saved keys carry the `roberta.`/`bert.` prefix.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForMaskedLM

    model_class = AutoModelForMaskedLM if masked_lm else AutoModel
    base = model_class.from_pretrained(base_path, attn_implementation="eager", dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora_options)
    return get_peft_model(base, config).eval()


def save_peft_adapter(folder: Path, base_path: Path, *, masked_lm: bool = False, seed: int = 0, **lora_options):
    """Build a random adapter with `peft`, `save_pretrained` it to `folder`, return the PeftModel."""
    model = make_peft_model(base_path, masked_lm=masked_lm, seed=seed, **lora_options)
    model.save_pretrained(folder)
    return model


def last_hidden_state(model, input_ids: np.ndarray, attention_mask: np.ndarray, *, adapter: bool = True) -> torch.Tensor:
    """[n, L, H] from a PeftModel (with its adapter, or with it disabled) or a plain HF model."""
    inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    with torch.no_grad():
        if adapter or not hasattr(model, "disable_adapter"):
            output = model(**inputs, output_hidden_states=True)
        else:
            with model.disable_adapter():
                output = model(**inputs, output_hidden_states=True)
    return output.hidden_states[-1]


def pooled(hidden: torch.Tensor, attention_mask: np.ndarray, mode: str) -> np.ndarray:
    """sentence-transformers pooling of [n, L, H]: the first token, or the mean over the mask."""
    if mode == "cls":
        return hidden[:, 0].numpy()
    mask = torch.from_numpy(attention_mask).unsqueeze(-1).to(hidden.dtype)  # [n, L, 1]
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()
