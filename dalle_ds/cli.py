"""Console scripts: ``dalle-train ARGS`` runs exactly what ``python -m dalle_ds.train ARGS`` runs.

Each command executes its module as ``__main__`` (runpy, as ``python -m`` does), so the module's own
``if __name__ == "__main__":`` block decides the exit status and the clean-up. ``pyproject.toml``'s
``[project.scripts]`` maps ``dalle-<name>`` to ``dalle_ds.cli:<name>`` for every entry here
(tests/test_packaging.py holds the two equal).
"""

from __future__ import annotations

import runpy
from typing import Callable


def _entry(module: str) -> Callable[[], None]:
    def run() -> None:
        runpy.run_module(module, run_name="__main__", alter_sys=True)

    run.__doc__ = f"python -m {module}"
    run.module = module  # type: ignore[attr-defined]
    return run


# pipeline stages, in order
make_shapes_corpus = _entry("data_prep.make_shapes_corpus")
shard_corpus = _entry("data_prep.shard_corpus")
train_tokenizer = _entry("data_prep.train_text_tokenizer")
train_dvae = _entry("dalle_ds.train_dvae")
tokenize_images = _entry("data_prep.tokenize_images")
train = _entry("dalle_ds.train")
train_clip = _entry("dalle_ds.train_clip")
export = _entry("dalle_ds.export")
# using and judging a model
sample = _entry("dalle_ds.sample")
serve = _entry("dalle_ds.serve")
evaluate = _entry("dalle_ds.evaluate")
evaluate_dvae = _entry("dalle_ds.evaluate_dvae")
evaluate_captions = _entry("dalle_ds.evaluate_captions")
# tools
plan = _entry("dalle_ds.plan")
convert_openai_dvae = _entry("dalle_ds.convert_openai_dvae")

COMMANDS: dict[str, str] = {f"dalle-{name.replace('_', '-')}": fn.module for name, fn in list(globals().items())
                            if callable(fn) and hasattr(fn, "module")}
