"""Config namespace and profiles: validation errors name the fix; the shipped profiles are well-formed."""
import ast
import json
import re

import pytest
import yaml

from utils import pipeline
from utils.config import (
    PROFILES_DIR,
    REPO_ROOT,
    SETTINGS_CLASSES,
    ConfigError,
    TrainConfig,
    check_run_settings,
    known_settings,
    load_profile,
)


def test_defaults_are_the_paper_recipe():
    cfg = TrainConfig()
    assert (cfg.sam, cfg.optimizer, cfg.sam_rho, cfg.momentum, cfg.weight_decay, cfg.lr, cfg.batch_size) == \
        ("sam", "sgd", 0.05, 0.9, 5e-3, 1e-3, 8)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.img_size, cfg.save_last_k, len(cfg.folds)) == (50, 2.0, 512, 5, 2)


@pytest.mark.parametrize("field, value, message", [
    ("head", "softmax", "choose one of"), ("pooling", "gem", "choose one of"), ("optimizer", "lamb", "choose one of"),
    ("sam", "gsam", "choose one of"), ("compile", "fast", "choose one of"),
    ("save_last_k", 99, "save_last_k"), ("in_chans", 4, "in_chans"), ("folds", [], "at least one fold"),
])
def test_bad_values_fail_with_the_fix(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_compile_takes_a_switch_or_a_torch_compile_mode(tmp_path):
    assert [TrainConfig(compile=v).compile_mode for v in (False, True, "reduce-overhead")] == \
        [None, "default", "reduce-overhead"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({**TrainConfig().to_dict(), "compile": True}))
    assert TrainConfig.load_yaml(tmp_path / "old.yaml").compile_mode == "default"  # configs saved as a switch load


def test_from_namespace_picks_fields_and_roundtrips(tmp_path):
    cfg = TrainConfig.from_namespace({"arch": "resnet18", "epochs": 3, "save_last_k": 2, "folds": (1,), "unrelated": 1})
    assert (cfg.arch, cfg.epochs, cfg.folds) == ("resnet18", 3, [1])
    cfg.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.load_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_shipped_profiles_build_valid_configs(profile):
    loaded = load_profile(profile)
    assert loaded["models"], "a profile trains at least one model"
    assert len(check_run_settings(loaded, {})["train"]) == len(loaded["models"])  # strict: keys, types, ranges


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ConfigError, match="known profiles: .*demo"):
        load_profile("nope")


@pytest.mark.parametrize("name, pooling", [("paper", "avg"), ("paper_text", "hybrid")])
def test_paper_profiles_are_the_table2_ensemble(name, pooling):
    # paper: the seed code, whose hybrid pooling module was never called; paper_text: the paper's words
    paper = load_profile(name)
    combos = {(m["arch"], m["head"], m.get("pooling", paper["params"]["pooling"])) for m in paper["models"]}
    assert combos == {("resnext50_32x4d", "exp", "avg"), ("resnest50d", "exp", pooling),
                      ("resnest101e", "exp", pooling), ("resnest50d", "ldl", pooling)}
    assert paper["params"]["img_size"] == 512 and paper["params"]["epochs"] == 50


# ------------------------------------------------------------------------------------------- strict settings

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def write_profile(path, params, models):
    path.write_text(yaml.safe_dump({"params": params, "models": models}))
    return load_profile(path)


@pytest.mark.parametrize("params, model, overrides, where, key, closest", [
    ({"weight_decy": 0.1}, {}, {}, "params", "weight_decy", "weight_decay"),
    ({}, {"epoch": 3}, {}, "models[0] (m)", "epoch", "epochs"),
    ({}, {}, {"lerning_rate": 1}, "-p", "lerning_rate", None),
    ({}, {"n_folds": 3}, {}, "models[0] (m)", "n_folds", None),  # a model entry takes training settings only
])
def test_an_unknown_key_names_the_file_the_key_and_the_closest_names(tmp_path, params, model, overrides, where,
                                                                     key, closest):
    profile = write_profile(tmp_path / "p.yaml", params, [{"model_name": "m", **model}])
    with pytest.raises(ConfigError) as info:
        check_run_settings(profile, overrides)
    message = str(info.value)
    assert f"unknown setting {key!r}" in message and where in message
    assert ("p.yaml" in message) == (where != "-p")
    if closest:
        assert f"closest valid names: {closest}" in message


@pytest.mark.parametrize("overrides, fragment", [
    ({"epochs": "abc"}, "-p: epochs='abc': expected a whole number"),
    ({"epochs": 2.5}, "-p: epochs=2.5: expected a whole number"),
    ({"lr": -1}, "-p: lr=-1.0: must be > 0"),
    ({"folds": [7]}, "-p: folds=[7]: fold 7 does not exist with n_folds=5"),
    ({"img_size": 0}, "-p: img_size=0: use at least 16 px"),
    ({"arch": "resnet181"}, "-p: arch='resnet181': not a timm architecture; closest: resnet18"),
    ({"n_folds": 1}, "-p: n_folds=1: cross-validation needs at least 2 folds"),
    ({"split": "Tset"}, "-p: split='Tset': choose one of Val, Test"),
    ({"selfsup_method": "dino"}, "-p: selfsup_method='dino': choose one of simclr, simsiam, byol"),
    ({"selfsup_dedup": 1.5}, "-p: selfsup_dedup=1.5: 0 (off), or a correlation up to 1"),
    ({"data_dir": "/x"}, "'data_dir' is set by run_all.sh"),
])
def test_bad_values_fail_before_anything_runs_naming_their_source(tmp_path, overrides, fragment):
    profile = write_profile(tmp_path / "p.yaml", {"epochs": 3, "save_last_k": 1}, [{"model_name": "m"}])
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        check_run_settings(profile, overrides)


def test_a_bad_value_in_a_model_entry_names_the_entry(tmp_path):
    profile = write_profile(tmp_path / "p.yaml", {}, [{"model_name": "ok"}, {"model_name": "bad", "head": "softmax"}])
    with pytest.raises(ConfigError, match=r"p.yaml: models\[1\] \(bad\): head='softmax': choose one of"):
        check_run_settings(profile, {})


def test_the_pipeline_checks_settings_before_writing_or_decoding_anything(tmp_path, capsys):
    for args in (["-p", "epochs", "2.5"], ["-p", "weight_decy", "0.1"], ["-p", "folds", "[7]"]):
        assert pipeline.main(["--workdir", str(tmp_path)] + args) == 1
        assert "error: -p" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no runs/, no phantom set, no cache


def test_a_key_of_a_stage_left_out_is_not_unknown(tmp_path):
    profile = write_profile(tmp_path / "p.yaml", {"n_folds": 3, "greedy_selection": True}, [{"model_name": "m"}])
    settings = check_run_settings(profile, {"split": "Test"})
    assert settings["folds"].n_folds == 3 and settings["submit"].split == "Test"
    assert settings["ensemble"].greedy_selection


def _parameters(notebook):
    cells = [c for c in json.loads(notebook.read_text())["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{notebook.name}: exactly one parameters cell"
    tree = ast.parse("".join(cells[0]["source"]))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_parameters_are_the_settings_with_their_defaults(notebook):
    """Each notebook parameter is a field of one settings class with the same default: the two cannot drift."""
    owners = known_settings()
    for name, value in _parameters(notebook).items():
        assert name in owners, f"{notebook.name}: {name} is not a setting of utils.config"
        assert value == owners[name].defaults()[name], f"{notebook.name}: {name} = {value!r} differs from " \
            f"{owners[name].__name__}'s default {owners[name].defaults()[name]!r}"


RECIPE_PARAMETERS = {"profile", "overrides", "data_dir", "run_dir", "cache_dir"}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_takes_its_recipe_from_a_profile_and_runs_the_demo_by_default(notebook):
    """One parameters cell: the profile (the one place recipes are written), overrides checked like -p, the paths;
    opened in Jupyter, the defaults are the demo (minutes on a CPU), in the project's own kernel."""
    parameters = _parameters(notebook)
    assert RECIPE_PARAMETERS <= set(parameters)
    assert parameters["profile"] == "demo" and parameters["overrides"] == {}
    extra = {"02_train": {"train_models", "role"}, "04_pseudo_label": {"role"}, "05_submit": {"submission_csv"}}
    assert set(parameters) - RECIPE_PARAMETERS == extra.get(notebook.stem, set())
    assert json.loads(notebook.read_text())["metadata"]["kernelspec"]["name"] == "percovid"
    assert "sys.path" not in notebook.read_text(), notebook.name


def test_the_pipeline_passes_notebooks_only_what_they_declare_and_reports_from_02_and_04(tmp_path):
    from utils import runs

    run = runs.resolve("demo", {"epochs": 3}, run_dir=tmp_path / "r")
    steps = pipeline.plan(run, tmp_path / "s.csv", pipeline.STAGES)
    reports = [s for s in steps if s.notebook in ("02_train", "04_pseudo_label")]
    assert reports and all(s.parameters["role"] == "report" for s in reports)
    assert [s.parameters["train_models"] for s in steps if s.notebook == "02_train"] == \
        [["resnet18_ldl_hybrid"], ["resnet18_reg_avg_sam"], ["resnet18_ldl_hybrid_pl"]]
    assert all(s.parameters["overrides"] == {"epochs": 3} for s in steps if s.notebook)
    (tmp_path / "train_only" / "Train").mkdir(parents=True)  # nothing to pseudo-label: no retrains planned
    run = runs.resolve("demo", {}, data_dir=tmp_path / "train_only", run_dir=tmp_path / "r")
    assert [s.parameters["train_models"] for s in pipeline.plan(run, tmp_path / "s.csv", pipeline.STAGES)
            if s.notebook == "02_train"] == [["resnet18_ldl_hybrid"], ["resnet18_reg_avg_sam"]]


def test_every_setting_is_defined_once():
    names = [name for cls in SETTINGS_CLASSES for name in cls.field_names()]
    assert len(names) == len(set(names))


def test_a_saved_recipe_of_another_version_names_the_file_and_the_key(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text("arch: resnet18\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"config.yaml: .*'learning_rate'.*another version of this suite"):
        TrainConfig.load_yaml(saved)
    saved.write_text("")
    with pytest.raises(ConfigError, match="config.yaml holds no recipe"):
        TrainConfig.load_yaml(saved)
