"""Reference outputs of small random decoder models (GPT-2, T5) made by Hugging Face transformers.

Needs torch and transformers (not test dependencies):
    python scripts/make_zoo_decoder_reference.py      # writes tests/fixtures/zoo/<family>/

Each family's folder gets the model as transformers saves it (config.json, model.safetensors) and
expected.npz with fixed inputs and transformers' outputs for them.
"""

import os

import numpy as np
import torch
import transformers

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "zoo")


def save(folder, model, **arrays):
    path = os.path.join(ROOT, folder)
    model.save_pretrained(path, safe_serialization=True)
    np.savez_compressed(os.path.join(path, "expected.npz"), **arrays)
    print(f"wrote {path}: {sorted(arrays)}")


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    token_ids = np.random.default_rng(0).integers(0, 100, size=(2, 12))
    with torch.no_grad():
        out = model(torch.tensor(token_ids), output_hidden_states=True)
    save("gpt2", model, token_ids=token_ids.astype(np.int32),
         logits=out.logits.numpy(), hidden=out.hidden_states[-1].numpy())


if __name__ == "__main__":
    torch.manual_seed(0)
    for family in (gpt2,):
        family()
