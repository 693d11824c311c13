import pytest
import yaml

from dalle_ds.config import ConfigError, load_config, parse_overrides


def test_presets_load_and_paper_figures():
    paper = load_config("paper")
    assert (paper.model.n_layers, paper.model.n_heads, paper.model.d_model) == (64, 62, 3968)
    assert paper.model.head_dim == 64 and paper.model.seq_len == 256 + 1024
    assert paper.dvae.codebook_size == 8192 and paper.dvae.downsample == 8
    assert paper.optim.betas == (0.9, 0.96) and paper.optim.lr == 4.5e-4
    tiny = load_config("tiny")
    assert tiny.model.image_grid == tiny.data.image_size // tiny.dvae.downsample


def test_override_precedence_and_types():
    cfg = load_config("tiny", ["optim.lr=3e-4", "model.attention=dense", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.attention == "dense"
    assert cfg.optim.betas == (0.8, 0.9)
    assert load_config("tiny").optim.lr == 2e-3  # file beats defaults, untouched by the above


@pytest.mark.parametrize("override, fragment", [
    (["optim.lrr=1"], "optim.lrr=1: unknown key"),
    (["nosuch.key=1"], "nosuch=: unknown key"),
    (["optim.lr=fast"], "optim.lr='fast': must be a number"),
    (["model.n_layers=2.5"], "model.n_layers=2.5: must be an int"),
    (["model.activation_checkpointing=1"], "model.activation_checkpointing=1: must be a bool"),
    (["model.attention=magic"], "model.attention='magic': must be one of"),
    (["model.n_heads=5"], "model.n_heads=5: must divide model.d_model=128"),
    (["model.image_vocab_size=100"], "model.image_vocab_size=100: must equal dvae.codebook_size=512"),
    (["data.image_size=96"], "model.image_grid=16: must equal data.image_size // dvae.downsample"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]: must have 2 elements"),
    (["dvae_train.recon_loss=l2"], "dvae_train.recon_loss='l2': must be one of"),
    (["dvae_train.marginal_kl_weight=-1"], "dvae_train.marginal_kl_weight=-1"),
    (["optim.lr"], "'optim.lr': an override must look like section.key=value"),
])
def test_errors_name_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", override)
    assert fragment.replace("nosuch=", "nosuch={'key': 1}") in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"config='nope'.*tiny"):
        load_config("nope")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["run.seed=7"])
    path = cfg.save(tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text())["run"]["seed"] == 7


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
