"""Config namespace and profiles: validation errors name the fix; the shipped profiles are well-formed."""
import pytest

from utils.config import PROFILES_DIR, ConfigError, TrainConfig, load_profile


def test_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.sam, cfg.optimizer, cfg.sam_rho, cfg.momentum, cfg.weight_decay, cfg.lr, cfg.batch_size) == \
        ("sam", "sgd", 0.05, 0.9, 5e-3, 1e-3, 8)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.img_size, cfg.save_last_k, len(cfg.folds)) == (50, 2.0, 512, 5, 2)


@pytest.mark.parametrize("field, value, message", [
    ("head", "softmax", "choose one of"), ("pooling", "gem", "choose one of"), ("optimizer", "lamb", "choose one of"), ("sam", "gsam", "choose one of"),
    ("save_last_k", 99, "save_last_k"), ("in_chans", 4, "in_chans"), ("folds", [], "at least one fold"),
])
def test_bad_values_fail_with_the_fix(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_from_namespace_picks_fields_and_roundtrips(tmp_path):
    cfg = TrainConfig.from_namespace({"arch": "resnet18", "epochs": 3, "save_last_k": 2, "folds": (1,), "unrelated": 1})
    assert (cfg.arch, cfg.epochs, cfg.folds) == ("resnet18", 3, [1])
    cfg.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.load_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_shipped_profiles_build_valid_configs(profile):
    loaded = load_profile(profile)
    assert loaded["models"], "a profile trains at least one model"
    for model in loaded["models"]:
        fields = {k: v for k, v in {**loaded["params"], **model}.items() if k in TrainConfig.field_names()}
        TrainConfig(**fields)


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="known profiles: .*demo"):
        load_profile("nope")


def test_paper_profile_is_the_table2_ensemble():
    paper = load_profile("paper")
    combos = {(m["arch"], m["head"], m["pooling"]) for m in paper["models"]}
    assert combos == {("resnext50_32x4d", "exp", "avg"), ("resnest50d", "exp", "hybrid"),
                      ("resnest101e", "exp", "hybrid"), ("resnest50d", "ldl", "hybrid")}
    assert paper["params"]["img_size"] == 512 and paper["params"]["epochs"] == 50
