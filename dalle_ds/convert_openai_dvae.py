"""Convert OpenAI's released dVAE (PyPI ``DALL-E``, module ``dall_e``) into a dalle_ds export.

    python -m dalle_ds.convert_openai_dvae --encoder encoder.pkl --decoder decoder.pkl --output DIR

``encoder.pkl``/``decoder.pkl`` are whole pickled ``dall_e.Encoder``/``Decoder`` modules, so
loading them runs pickle (``weights_only=False``) and needs ``dall_e`` importable: use local files
you trust. Their convs hold ``w``/``b``; ours are ``nn.Conv2d`` (``weight``/``bias``) under the same
module names, with the two fp32 1x1 convs wrapped one level deeper (``Fp32Conv.conv``).
Usage of the result matches theirs: ``vae.logits(x)`` == ``enc(map_pixels(x))`` and
``vae.decode_stats(z)`` == ``dec(z)`` split into (mu, ln b).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from dalle_ds.cli_args import Parser, run
from dalle_ds.config import DVAEConfig
from dalle_ds.models.dvae import DiscreteVAE, Fp32Conv, save_dvae

OPENAI_GROUPS = 4  # their layout always has 4 groups; group_count only sets post_gain


def config_from_openai(enc: nn.Module, dec: nn.Module) -> DVAEConfig:
    pairs = {"n_hid": (enc.n_hid, dec.n_hid), "n_blk_per_group": (enc.n_blk_per_group, dec.n_blk_per_group),
             "codebook_size": (enc.vocab_size, dec.vocab_size),
             "channels": (enc.input_channels, dec.output_channels)}
    for name, (a, b) in pairs.items():
        if a != b:
            raise ValueError(f"encoder and decoder disagree on {name}: {a} vs {b}")
    for which, m in (("encoder", enc), ("decoder", dec)):
        if m.group_count != OPENAI_GROUPS:
            raise ValueError(f"{which}.group_count={m.group_count}: dall_e always builds {OPENAI_GROUPS} groups, "
                             "so its post_gain would not match any dalle_ds layout")
    cfg = DVAEConfig(channels=enc.input_channels, n_hid=enc.n_hid, n_blk_per_group=enc.n_blk_per_group,
                     group_count=OPENAI_GROUPS, codebook_size=enc.vocab_size, n_init=dec.n_init)
    cfg.validate()
    return cfg


def _convert_state(theirs: dict[str, torch.Tensor], ours: nn.Module, which: str) -> dict[str, torch.Tensor]:
    wrapped = [name + "." for name, m in ours.named_modules() if isinstance(m, Fp32Conv)]
    out = {}
    for key, tensor in theirs.items():
        prefix, leaf = key.rsplit(".", 1)
        if leaf not in ("w", "b"):
            raise KeyError(f"{which}: unexpected parameter {key!r} (dall_e convs hold only w and b)")
        prefix += "."
        if prefix in wrapped:
            prefix += "conv."
        out[prefix + ("weight" if leaf == "w" else "bias")] = tensor.detach().float()
    expected = set(ours.state_dict())
    if set(out) != expected:
        raise KeyError(f"{which}: converted names do not match dalle_ds's: missing "
                       f"{sorted(expected - set(out))[:5]}, unexpected {sorted(set(out) - expected)[:5]}")
    return out


def convert(enc: nn.Module, dec: nn.Module) -> DiscreteVAE:
    """dall_e Encoder + Decoder modules -> an equivalent dalle_ds DiscreteVAE (fp32, eval mode)."""
    vae = DiscreteVAE(config_from_openai(enc, dec))
    vae.encoder.load_state_dict(_convert_state(enc.state_dict(), vae.encoder, "encoder"))
    vae.decoder.load_state_dict(_convert_state(dec.state_dict(), vae.decoder, "decoder"))
    return vae.eval()


def _load_pickle(path: str, kind: str) -> nn.Module:
    try:
        import dall_e  # noqa: F401 - the pickles reference dall_e classes
    except ImportError as e:
        raise SystemExit(f"{path}: loading it needs OpenAI's package: pip install --no-deps DALL-E==0.1 ({e})")
    module = torch.load(path, map_location="cpu", weights_only=False)
    if type(module).__name__ != kind:
        raise SystemExit(f"{path}: expected a pickled dall_e {kind}, got {type(module).__name__}")
    return module


def main(argv: list[str] | None = None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", required=True, help="local path of OpenAI's encoder.pkl")
    ap.add_argument("--decoder", required=True, help="local path of OpenAI's decoder.pkl")
    ap.add_argument("--output", required=True, help="folder for model.safetensors + config.json")
    args = ap.parse_args(argv)
    for p in (args.encoder, args.decoder):
        if "://" in p:
            raise SystemExit(f"{p}: only local paths are accepted (download the file first)")
    vae = convert(_load_pickle(args.encoder, "Encoder"), _load_pickle(args.decoder, "Decoder"))
    source = {"encoder": args.encoder, "decoder": args.decoder, "format": "openai dall_e 0.1"}
    meta = save_dvae(vae, args.output, extra={"image_size": 256, "source": source})
    n = sum(p.numel() for p in vae.parameters())
    print(f"wrote {args.output} ({n / 1e6:.1f}M parameters, sha256 {meta['weights_sha256'][:12]})", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(run(main))
