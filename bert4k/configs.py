"""Reading model configs (Google `bert_config.json`, Hugging Face `config.json`) into builder
arguments. Kept apart from models.py because the key aliases and the lists of metadata keys are
about file formats, not about the network."""

import json
import os

# File key -> builder argument.
ALIASES = {
    "hidden_dropout_prob": "dropout_rate",
    "attention_probs_dropout_prob": "attention_dropout_rate",
    "max_position_embeddings": "max_position",
    "type_vocab_size": "segment_vocab_size",
    "layer_norm_eps": "layer_norm_epsilon",
    "layer_norm_epsilon": "layer_norm_epsilon",
    # GPT-2 (Hugging Face config.json and OpenAI's hparams.json)
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position",
    "n_inner": "intermediate_size",
    "n_vocab": "vocab_size",
    "activation_function": "hidden_act",
    "afn": "hidden_act",  # OpenAI GPT
    "resid_pdrop": "dropout_rate",
    "attn_pdrop": "attention_dropout_rate",
    # T5
    "d_model": "hidden_size",
    "d_kv": "attention_head_size",
    "d_ff": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}

# Keys that describe training runs, tokenizers or generation, not the network: accepted in a file
# and dropped. Anything else unknown is an error, so a typo never silently changes the model.
METADATA_KEYS = frozenset(
    """
    _name_or_path architectures model_type transformers_version torch_dtype dtype use_cache
    gradient_checkpointing classifier_dropout output_past id2label label2id num_labels
    finetuning_task problem_type output_hidden_states output_attentions return_dict is_decoder
    add_cross_attention tie_word_embeddings bos_token_id eos_token_id sep_token_id
    decoder_start_token_id tokenizer_class prefix task_specific_params chunk_size_feed_forward
    pruned_heads torchscript use_bfloat16 tf_legacy_loss cross_attention_hidden_size
    is_encoder_decoder max_length min_length do_sample early_stopping num_beams temperature top_k
    top_p repetition_penalty length_penalty no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens diversity_penalty num_beam_groups typical_p
    encoder_no_repeat_ngram_size _attn_implementation_autoset _attn_implementation
    directionality pooler_fc_size pooler_num_attention_heads pooler_num_fc_layers
    pooler_size_per_head pooler_type
    embd_pdrop summary_type summary_use_proj summary_activation summary_proj_to_labels
    summary_first_dropout scale_attn_weights reorder_and_upcast_attn
    scale_attn_by_inverse_layer_idx add_bias_logits
    classifier_dropout_prob summary_last_dropout
    """.split()
)


def _roberta(config, arguments, source):
    # fairseq/HF RoBERTa reserve rows 0..pad_token_id of the position table: position p reads row
    # p + pad_token_id + 1, and max_position_embeddings counts those rows.
    arguments["position_offset"] = config.get("pad_token_id", 1) + 1


def _albert(config, arguments, source):
    for key in ("num_hidden_groups", "inner_group_num"):
        value = arguments.pop(key, 1)
        if value != 1:
            raise ValueError(f"{source}: {key}={value} is not supported; ALBERT releases share one "
                             "group of one block (1).")


def _roformer(config, arguments, source):
    if arguments.pop("rotary_value", False):
        raise ValueError(f"{source}: rotary_value=true (rotating the values too) is not supported.")


# Hugging Face model_type -> translation of its config keys that differ from BERT's. XLM-R and
# CamemBERT are RoBERTa's network with other vocabularies.
MODEL_TYPE_TRANSLATIONS = {"roberta": _roberta, "xlm-roberta": _roberta, "camembert": _roberta,
                           "albert": _albert, "roformer": _roformer}

# Hugging Face model_type -> the bert4k model names that can read such a checkpoint.
COMPATIBLE_MODEL_TYPES = {
    "bert": {"bert", "roberta", "nezha"},
    "roberta": {"roberta", "bert"},
    "xlm-roberta": {"roberta", "bert"},
    "camembert": {"roberta", "bert"},
    "albert": {"albert", "albert_unshared"},
    "electra": {"electra"},
    "roformer": {"roformer", "roformer_v2"},
    "gpt2": {"gpt2"},
    "openai-gpt": {"gpt"},
    "t5": {"t5", "t5.1.0", "t5.1.1", "mt5.1.1", "t5_encoder", "t5_decoder", "t5.1.0_encoder",
           "t5.1.0_decoder", "t5.1.1_encoder", "t5.1.1_decoder", "mt5.1.1_encoder",
           "mt5.1.1_decoder"},
    "mt5": {"mt5.1.1", "t5.1.1", "t5_encoder", "t5_decoder", "t5.1.1_encoder", "t5.1.1_decoder",
            "mt5.1.1_encoder", "mt5.1.1_decoder"},
}


def read_config_file(path):
    """The JSON object in `path`, with errors that name the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("config.json", "bert_config.json"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"No config.json or bert_config.json in directory {path!r}.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Config file not found: {path!r}.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"Config file {path!r} is not valid JSON: {e}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"Config file {path!r} must hold a JSON object, got {type(config).__name__}.")
    return config


def config_to_arguments(config, model, source="config"):
    """Translate file keys into builder arguments; reject a config of another architecture and
    validate settings we cannot honour."""
    model_type = config.get("model_type")
    allowed = COMPATIBLE_MODEL_TYPES.get(model_type)
    if allowed is not None and isinstance(model, str) and model not in allowed:
        raise ValueError(
            f"{source} describes a {model_type!r} model but model={model!r} was asked for; "
            f"build it with model={sorted(allowed)[0]!r}."
        )
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"{source}: position_embedding_type={position_type!r} is not supported; "
            "only 'absolute' positions (use model='nezha' for relative positions)."
        )
    config = dict(config)
    if model_type in ("t5", "mt5"):
        config = _t5_config(config)
    if model_type == "openai-gpt" and config.get("afn") == "gelu":
        config["afn"] = "gelu_new"  # OpenAI GPT's 'gelu' is the tanh approximation
    if "n_ctx" in config:  # OpenAI's hparams.json names the context n_ctx; HF's n_positions wins
        config.setdefault("n_positions", config["n_ctx"])
        del config["n_ctx"]
    arguments = {}
    for key, value in config.items():
        if key in METADATA_KEYS or key == "position_embedding_type":
            continue
        arguments[ALIASES.get(key, key)] = value
    if model_type in MODEL_TYPE_TRANSLATIONS:
        MODEL_TYPE_TRANSLATIONS[model_type](config, arguments, source)
    return arguments


def _t5_config(config):
    """HF T5 configs give the version through the feed-forward: gated-GELU is 1.1 (and mT5),
    ReLU is 1.0 (its output tied to the scaled embeddings)."""
    gated = config.pop("is_gated_act", None)
    projection = config.pop("feed_forward_proj", "relu")
    gated = projection.startswith("gated-") if gated is None else gated
    activation = config.pop("dense_act_fn", projection.replace("gated-", ""))
    activation = "gelu_new" if activation == "gelu" and gated else activation
    config["version"] = ("mt5.1.1" if config["model_type"] == "mt5" else "t5.1.1") if gated \
        else "t5.1.0"
    config["hidden_act"] = [activation, "linear"] if gated else activation
    for key in ("initializer_factor", "n_positions", "tie_word_embeddings",
                "scale_decoder_outputs"):
        config.pop(key, None)
    return config


def load_config(config_path, model):
    if config_path is None:
        return {}
    return config_to_arguments(read_config_file(config_path), model, source=os.fspath(config_path))
