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
    if getattr(model, "untied_lm_head", False):
        # transformers 5 ties T5's output to its embeddings and drops lm_head on save; T5 1.1
        # releases have their own lm_head, so write the file as they do.
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not k.endswith("embed_tokens.weight")}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
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


def gpt():
    config = transformers.OpenAIGPTConfig(
        vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.OpenAIGPTLMHeadModel(config).eval()
    token_ids = np.random.default_rng(2).integers(0, 100, size=(2, 12))
    with torch.no_grad():
        out = model(torch.tensor(token_ids), output_hidden_states=True)
    save("gpt", model, token_ids=token_ids.astype(np.int32),
         logits=out.logits.numpy(), hidden=out.hidden_states[-1].numpy())


def t5(folder, gated):
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    if gated:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(100, 32) * 0.2)
        model.untied_lm_head = True
    rng = np.random.default_rng(1)
    encoder_ids = rng.integers(2, 100, size=(2, 25))
    encoder_ids[1, 18:] = 0  # padding
    decoder_ids = rng.integers(2, 100, size=(2, 22))
    decoder_ids[:, 0] = 0  # decoding starts from the pad id
    with torch.no_grad():
        out = model(input_ids=torch.tensor(encoder_ids),
                    attention_mask=torch.tensor((encoder_ids != 0).astype(np.int64)),
                    decoder_input_ids=torch.tensor(decoder_ids))
    save(folder, model, encoder_ids=encoder_ids.astype(np.int32),
         decoder_ids=decoder_ids.astype(np.int32), logits=out.logits.numpy(),
         encoder_output=out.encoder_last_hidden_state.numpy())


if __name__ == "__main__":
    torch.manual_seed(0)
    gpt2()
    gpt()
    t5("t5", gated=False)
    t5("t5.1.1", gated=True)
