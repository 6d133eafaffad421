"""Reference outputs of tiny random encoder models (RoBERTa, XLM-RoBERTa, ALBERT, ELECTRA
discriminator and generator, RoFormer) computed by Hugging Face transformers, for
tests/test_zoo_encoders.py.

Each family gets tests/fixtures/zoo/<family>/ with the model.safetensors and config.json that
transformers' save_pretrained writes, and expected.npz: the fixed inputs (with padding) and the
outputs transformers computes from them. The weights are random (fixed seed) and tiny (hidden 32,
2 layers, vocabulary 100), so the fixtures stay a few tens of kilobytes each.

Needs torch and transformers, which the test suite never imports:
    pip install torch==2.13.0 transformers safetensors
    python scripts/make_zoo_reference.py [--only albert,roformer]
"""

import argparse
import os
import shutil
import tempfile

import numpy as np
import torch
import transformers

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "zoo")

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act="gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    max_position_embeddings=64,
    type_vocab_size=2,
    initializer_range=0.5,  # large weights: a wrong mapping cannot hide behind tiny activations
)


def inputs(pad_id, length=12):
    """Three rows of ids in [3, 100), the first two padded at the end; a second segment."""
    rng = np.random.default_rng(7)
    ids = rng.integers(3, 100, size=(3, length))
    ids[ids == pad_id] = pad_id + 3
    segments = np.zeros_like(ids)
    segments[:, length // 2:] = 1
    for row, real in enumerate([length - 4, length - 1, length]):
        ids[row, real:] = pad_id
        segments[row, real:] = 0
    return ids.astype(np.int64), segments.astype(np.int64)


def randomise(model, seed):
    """Random values for every parameter (LayerNorm and biases included, which HF initialises to
    ones and zeros), so that each weight's mapping is checked."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "embed_positions" in name:  # RoFormer's fixed sinusoidal table
                continue
            noise = torch.randn(parameter.shape, generator=generator) * 0.3
            if name.endswith("LayerNorm.weight") or name.endswith("layer_norm.weight") \
                    or name.endswith("full_layer_layer_norm.weight"):
                parameter.copy_(1.0 + noise)
            else:
                parameter.copy_(noise)
    return model


def run(model, ids, segments, pad_id, with_segments=True):
    kwargs = dict(input_ids=torch.tensor(ids),
                  attention_mask=torch.tensor((ids != pad_id).astype(np.int64)),
                  output_hidden_states=True)
    if with_segments:
        kwargs["token_type_ids"] = torch.tensor(segments)
    with torch.no_grad():
        return model(**kwargs)


def save(family, model, config, arrays):
    directory = os.path.join(FIXTURES, family)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        os.makedirs(directory, exist_ok=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy(os.path.join(tmp, name), os.path.join(directory, name))
    np.savez_compressed(os.path.join(directory, "expected.npz"),
                        **{k: np.asarray(v) for k, v in arrays.items()})
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    print(f"{family}: {sorted(arrays)} -> {directory} ({size / 1024:.0f} KiB)")


def numpy(tensor):
    return tensor.detach().numpy().astype(np.float32)


def make_roberta(family="roberta", config_class=transformers.RobertaConfig,
                 model_class=transformers.RobertaForMaskedLM, seed=1):
    # HF RoBERTa: pad id 1, positions start at pad_id + 1, one segment type.
    config = config_class(**dict(TINY, type_vocab_size=1, max_position_embeddings=66),
                          pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = randomise(model_class(config), seed=seed).eval()
    ids, segments = inputs(pad_id=1)
    segments[:] = 0
    out = run(model, ids, segments, pad_id=1)
    save(family, model, config, dict(
        token_ids=ids, segment_ids=segments,
        sequence_output=numpy(out.hidden_states[-1]), mlm_logits=numpy(out.logits)))


def make_xlm_roberta():
    # XLM-R: RoBERTa's network; its config.json says model_type 'xlm-roberta', which must get
    # RoBERTa's position offset too.
    make_roberta("xlm_roberta", transformers.XLMRobertaConfig,
                 transformers.XLMRobertaForMaskedLM, seed=6)


def make_albert():
    config = transformers.AlbertConfig(**TINY, embedding_size=16, num_hidden_groups=1,
                                       inner_group_num=1, classifier_dropout_prob=0.0)
    model = randomise(transformers.AlbertForPreTraining(config), seed=2).eval()
    ids, segments = inputs(pad_id=0)
    out = run(model, ids, segments, pad_id=0)
    base = model.albert(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(segments),
                        attention_mask=torch.tensor((ids != 0).astype(np.int64)))
    save("albert", model, config, dict(
        token_ids=ids, segment_ids=segments,
        sequence_output=numpy(out.hidden_states[-1]), pooled_output=numpy(base.pooler_output),
        mlm_logits=numpy(out.prediction_logits), sop_logits=numpy(out.sop_logits)))


def make_electra():
    config = transformers.ElectraConfig(**TINY, embedding_size=16)
    model = randomise(transformers.ElectraForPreTraining(config), seed=3).eval()
    ids, segments = inputs(pad_id=0)
    out = run(model, ids, segments, pad_id=0)
    save("electra", model, config, dict(
        token_ids=ids, segment_ids=segments,
        sequence_output=numpy(out.hidden_states[-1]), discriminator_logits=numpy(out.logits)))


def make_electra_generator():
    # The generator is smaller than the discriminator in the release; here it only has to differ
    # in layout: its encoder is named generator/ there, and it has an MLM head.
    config = transformers.ElectraConfig(**dict(TINY, hidden_size=24, num_attention_heads=3,
                                               intermediate_size=48), embedding_size=16)
    model = randomise(transformers.ElectraForMaskedLM(config), seed=4).eval()
    ids, segments = inputs(pad_id=0)
    out = run(model, ids, segments, pad_id=0)
    save("electra_generator", model, config, dict(
        token_ids=ids, segment_ids=segments,
        sequence_output=numpy(out.hidden_states[-1]), mlm_logits=numpy(out.logits)))


def make_roformer():
    config = transformers.RoFormerConfig(**TINY, embedding_size=16, rotary_value=False)
    model = randomise(transformers.RoFormerForMaskedLM(config), seed=5).eval()
    ids, segments = inputs(pad_id=0)
    out = run(model, ids, segments, pad_id=0)
    save("roformer", model, config, dict(
        token_ids=ids, segment_ids=segments,
        sequence_output=numpy(out.hidden_states[-1]), mlm_logits=numpy(out.logits)))


MAKERS = {
    "roberta": make_roberta,
    "xlm_roberta": make_xlm_roberta,
    "albert": make_albert,
    "electra": make_electra,
    "electra_generator": make_electra_generator,
    "roformer": make_roformer,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated families (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    for family in (args.only.split(",") if args.only else MAKERS):
        MAKERS[family]()


if __name__ == "__main__":
    main()
