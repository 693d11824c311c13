"""Export a prior run as a model bundle: prior + dVAE + tokenizer + resolved config + model card.

    python -m dalle_ds.export RUN_DIR OUTPUT [--dvae DVAE_EXPORT] [--tokenizer tokenizer.json] \\
        [--dtype fp32|fp16|bf16] [--max-shard-size 5GB] [--tag step_00001200]

RUN_DIR is a training run folder (``config.yaml`` + ``checkpoints/``); the latest checkpoint is
exported unless ``--tag`` names one. ``--dvae`` and ``--tokenizer`` default to the run's
``data.dvae`` and ``data.tokenizer``. The prior is written in ``--dtype`` as one
``model.safetensors`` or, above ``--max-shard-size``, as shards with ``model.safetensors.index.json``
(Hugging Face's layout). The folder layout is in dalle_ds/sampling/bundle.py; load it with
``Pipeline.from_pretrained(OUTPUT)`` or ``python -m dalle_ds.sample --bundle OUTPUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dalle_ds import cli_args
from dalle_ds.sampling.bundle import DTYPES, export_bundle


def parse_args(argv: list[str] | None = None):
    p = cli_args.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="training run folder (config.yaml + checkpoints/)")
    p.add_argument("out_dir", nargs="?", default=None, help="the bundle folder to write (or --output)")
    cli_args.add_output(p, aliases=(), help="the bundle folder to write (same as the positional OUTPUT)")
    p.add_argument("--dvae", default=None, help="dVAE export folder (default: the run's data.dvae)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's data.tokenizer)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the prior's weights")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the run's latest)")
    args = p.parse_args(argv)
    if args.out_dir and args.output and args.out_dir != args.output:
        p.error(f"OUTPUT {args.out_dir!r} and --output {args.output!r} differ: give one")
    args.output = args.output or args.out_dir
    if not args.output:
        p.error("the bundle folder is required: RUN_DIR OUTPUT (or --output OUTPUT)")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    info = export_bundle(args.run_dir, args.output, args.dvae, args.tokenizer, args.dtype, args.max_shard_size,
                         args.tag)
    out = Path(args.output)
    missing = [what for what, key in (("dVAE (--dvae)", "dvae"), ("tokenizer (--tokenizer)", "tokenizer"))
               if not info.get(key)]
    print(f"exported {info['tag']} of {args.run_dir} to {out}: prior {info['dtype']} in {', '.join(info['files'])}"
          + (f"; dvae/, tokenizer.json" if not missing else f"; no {' or '.join(missing)}: not a full bundle")
          + ", README.md, run_config.yaml")
    return out


if __name__ == "__main__":
    sys.exit(cli_args.run(lambda argv: main(argv) and 0))
