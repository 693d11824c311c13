"""Export a prior run to a consolidated ``model.safetensors`` + ``config.json`` for sampling.

    python -m dalle_ds.export RUN_DIR OUT_DIR [--tag step_00001200]

RUN_DIR is a training run folder (``config.yaml`` + ``checkpoints/``); the latest checkpoint is
exported unless ``--tag`` names one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from dalle_ds.parallel.checkpoint import export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="training run folder (config.yaml + checkpoints/)")
    p.add_argument("out_dir", help="where model.safetensors and config.json go")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the run's latest)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    run_cfg = yaml.safe_load((Path(args.run_dir) / "config.yaml").read_text())
    out = export(Path(args.run_dir) / "checkpoints", args.out_dir, run_cfg["model"], args.tag)
    print(f"exported {out / 'model.safetensors'} and {out / 'config.json'}")
    return out


if __name__ == "__main__":
    main()
