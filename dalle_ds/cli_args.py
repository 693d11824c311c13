"""One command-line style for every entry point (trainers, sampling, tools, data jobs).

    ap = cli_args.Parser(description=..., config=True)      # --config, --print-config, --dry-run, --debug
    cli_args.add_output(ap, default="samples")                 # --output (old spelling --out still accepted)
    args = ap.parse_args(argv)                                 # args.overrides: the dotted section.key=value
    cfg = cli_args.load(args)                                  # preset <- overrides, validated
    sys.exit(cli_args.run(main))                               # expected errors: one line, rank 0, exit 2

Conventions (README, "Command-line conventions"):
- flags are hyphenated; the underscore spelling of any flag is accepted too (``--deepspeed_config``,
  ``--local_rank`` as DeepSpeed's launcher passes them, ``--eval_shards``);
- outputs are ``--output``; commands that took ``--out`` or a positional still take them;
- dotted overrides (``optim.lr=1e-3``) may stand anywhere on the line;
- ``--help`` of a config-driven command lists every config section and key with its default;
- packaged files are found from the package, not the working directory: ``--config tiny`` is
  dalle_ds/configs/tiny.yaml, ``--deepspeed-config dvae.json`` falls back to dalle_ds/ds_configs/dvae.json;
- an expected error (:class:`~dalle_ds.config.ConfigError`: bad config, missing data) prints one line
  ``error: <key or path>: <why>`` from rank 0 and exits 2; ``--debug`` (or ``DALLE_DS_DEBUG=1``) shows
  the traceback instead; unexpected errors always show theirs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from dalle_ds.config import Config, ConfigError, load_config

DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"
EXIT_USAGE = 2  # what argparse returns for a usage error; expected errors use it too
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the project's conventions.

    ``config=True`` adds ``--config``, ``--print-config``, ``--dry-run``, collects dotted overrides
    from anywhere on the line into ``args.overrides`` and appends the config keys to ``--help``.
    Every parser gets ``--debug`` and accepts ``--flag_name`` for ``--flag-name``."""

    def __init__(self, *args: Any, config: bool = False, default_preset: str | None = "tiny", **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        if config:
            kwargs["epilog"] = (kwargs.get("epilog") or "") + config_help()
        super().__init__(*args, **kwargs)
        self.takes_overrides = config
        self.add_argument("--debug", action="store_true", help="show tracebacks for expected errors too")
        if config:
            self.add_argument("--config", default=default_preset, required=default_preset is None,
                              help="preset name (dalle_ds/configs: tiny, paper) or a YAML path"
                                   + (f" (default: {default_preset})" if default_preset else ""))
            self.add_argument("--print-config", action="store_true",
                              help="print the resolved config as YAML and exit")
            self.add_argument("--dry-run", action="store_true",
                              help="check config, data, dVAE and tokenizer, print the memory plan, exit")

    def _normalize(self, argv: list[str]) -> list[str]:
        """``--flag_name[=v]`` -> ``--flag-name[=v]`` when only the hyphenated spelling is defined."""
        out: list[str] = []
        for i, tok in enumerate(argv):
            if tok == "--":
                return out + argv[i:]
            if tok.startswith("--") and "_" in tok.split("=", 1)[0]:
                name, eq, value = tok.partition("=")
                hyphen = "--" + name[2:].replace("_", "-")
                if name not in self._option_string_actions and hyphen in self._option_string_actions:
                    tok = hyphen + eq + value
            out.append(tok)
        return out

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001 - argparse's signature
        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._normalize(argv), namespace)

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001
        ns, extra = self.parse_known_args(args, namespace)
        if self.takes_overrides:
            ns.overrides = [a for a in extra if OVERRIDE.match(a)]
            extra = [a for a in extra if not OVERRIDE.match(a)]
        if extra:
            hint = " (config overrides look like section.key=value)" if self.takes_overrides else ""
            self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        return ns


def add_output(ap: argparse.ArgumentParser, *, required: bool = False, default: str | None = None,
               help: str = "output folder", aliases: tuple[str, ...] = ("--out",)) -> None:
    """``--output`` (and the command's old spellings, e.g. ``--out``)."""
    ap.add_argument("--output", *aliases, dest="output", required=required, default=default,
                    help=help + (f" (default: {default})" if default else ""))


def add_deepspeed_config(ap: argparse.ArgumentParser, default: str | None = None) -> None:
    ap.add_argument("--deepspeed-config", default=default,
                    help="DeepSpeed JSON: a path, or the name of a packaged one in dalle_ds/ds_configs ("
                         + ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))) + ")"
                         + (f"; default {default}" if default else ""))
    ap.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher


def resolve_ds_config(path: str | None, key: str = "--deepspeed-config") -> str:
    """An existing path as given; else the packaged JSON of that name; else a ConfigError naming both."""
    if not path:
        raise ConfigError(f"{key}: required (a JSON path or one of "
                          f"{sorted(p.name for p in DS_CONFIG_DIR.glob('*.json'))})")
    if Path(path).is_file():
        return str(path)
    packaged = DS_CONFIG_DIR / Path(path).name
    if packaged.is_file():
        return str(packaged)
    raise ConfigError(f"{key}={path!r}: no such file, and no packaged DeepSpeed JSON of that name "
                      f"(packaged: {sorted(p.name for p in DS_CONFIG_DIR.glob('*.json'))})")


def load(args: argparse.Namespace) -> Config:
    return load_config(args.config, getattr(args, "overrides", []))


def print_config(cfg: Config) -> None:
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    sys.stdout.flush()


# ---------------------------------------------------------------- --help: the config keys


def load_run(args: argparse.Namespace) -> tuple[Config, str]:
    """A trainer's config and resolved DeepSpeed JSON path. ``--print-config`` prints the resolved
    YAML and exits 0 here, as ``--help`` does."""
    cfg = load(args)
    if args.print_config:
        print_config(cfg)
        raise SystemExit(0)
    return cfg, resolve_ds_config(args.deepspeed_config)


def _field_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # comment`` -> {name: comment} from the dataclass source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def config_help(cls: type = Config) -> str:
    """Every section and key of ``Config`` with its default (and its source comment)."""
    lines = ["config keys (defaults < --config preset < dotted overrides such as optim.lr=1e-3, anywhere "
             "on the line; --print-config shows the result):"]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = hints[f.name]
        doc = (inspect.getdoc(section) or "").split("\n")[0]
        lines.append(f"  {f.name}: {doc}")
        comments = _field_comments(section)
        default = f.default_factory()  # type: ignore[misc]
        for g in dataclasses.fields(section):
            value = getattr(default, g.name)
            shown = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                                   default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()
            note = f"  # {comments[g.name]}" if g.name in comments else ""
            lines.append(f"    {f.name}.{g.name}={shown}{note}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- errors: one line, rank 0, exit 2


def launch_rank() -> int:
    """This process's rank from the launcher's variables (before any process group exists)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Call ``main(argv)``; an expected error becomes one ``error: ...`` line on rank 0's stderr and
    exit code 2 (every rank exits 2). ``--debug`` or ``DALLE_DS_DEBUG=1`` re-raise it instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DALLE_DS_DEBUG", "") not in ("", "0")
    try:
        code = main(argv)
    except (ConfigError, FileNotFoundError) as e:  # expected: bad config, a named input that is not there
        if debug:
            raise
        if launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return code if isinstance(code, int) else 0
