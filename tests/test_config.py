import pytest

from scatgen.config import config_from_dict, config_to_dict, load_config, parse_overrides


def test_defaults_and_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  image_size: 64\ntrain:\n  lr: 3.0e-4\n")
    cfg = load_config(path, parse_overrides(["--train.batch_size=32", "--generator.kernel_size", "5",
                                             "--train.betas=0.5,0.9", "--train.code_noise=0.2"]))
    assert cfg.data.image_size == 64 and cfg.train.lr == 3e-4
    assert cfg.train.batch_size == 32 and cfg.generator.kernel_size == 5
    assert cfg.train.betas == (0.5, 0.9) and cfg.train.code_noise == 0.2


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ValueError, match="Did you mean 'train.lr'"):
        load_config(None, {"train.lrr": "1"})
    with pytest.raises(ValueError, match="Valid keys"):
        load_config(None, {"trian.lr": "1"})


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="expected a value of type int"):
        load_config(None, {"train.batch_size": "many"})
    with pytest.raises(ValueError, match=r"prior.code_weighting=-1.0 must be a number in \[0, 2\]"):
        load_config(None, {"prior.code_weighting": "-1"})
    with pytest.raises(ValueError, match=r"prior.latent_noise=2.0 must be a number in \[0, 1\]"):
        load_config(None, {"prior.latent_noise": "2"})
    with pytest.raises(ValueError, match=r"prior.autoencoder_width=-1 must be >= 0 \(0 = prior.width\)"):
        load_config(None, {"prior.autoencoder_width": "-1"})
    with pytest.raises(ValueError, match=r"prior.sde_noise=-0.5 must be a finite number >= 0"):
        load_config(None, {"prior.sde_noise": "-0.5"})
    with pytest.raises(ValueError, match="expected one of l1, l2"):
        load_config(None, {"train.loss": "huber"})
    with pytest.raises(ValueError, match="prior.mixed_precision.*expected one of auto, no, bf16"):
        load_config(None, {"prior.mixed_precision": "fp16"})
    with pytest.raises(ValueError, match="multiple of 2\\^J"):
        load_config(None, {"data.image_size": "40"})
    with pytest.raises(ValueError, match="needs data.root"):
        load_config(None, {"data.name": "celeba"})
    with pytest.raises(ValueError, match="unknown generator.kind"):
        load_config(None, {"generator.kind": "vae"})
    with pytest.raises(ValueError, match="generator.upsample"):
        load_config(None, {"generator.upsample": "cubic"})
    with pytest.raises(ValueError, match="exceeds the scattering dimension"):
        load_config(None, {"whitening.d": "100000"})


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="no value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ValueError, match="expected an override"):
        parse_overrides(["train.lr=1"])


def test_generator_kind_switches_its_fields():
    cfg = load_config(None, {"generator.kind": "sparse_deconv"})
    assert cfg.generator.kind == "sparse_deconv"
    with pytest.raises(ValueError, match="unknown config key 'generator.upsample'"):
        load_config(None, {"generator.kind": "sparse_deconv", "generator.upsample": "nearest"})


def test_dict_roundtrip():
    cfg = load_config(None, {"train.lr": "0.01", "encoder.J": "3"})
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ["polygons", "polygons-64", "polygons-gsn-original", "celeba64", "celeba128"])
def test_shipped_configs_load(name):
    from pathlib import Path

    overrides = {} if name.startswith("polygons") else {"data.root": "/somewhere"}
    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml", overrides)
    assert cfg.data.image_size % 2**cfg.encoder.J == 0
