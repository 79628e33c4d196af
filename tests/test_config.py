from pathlib import Path

import pytest

from kdci_ray.config import ConfigError, TeacherTrainConfig, apply_overrides, dump_config, load_config, validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("teacher-*.yaml")), ids=lambda p: p.name)
def test_committed_teacher_configs_validate(path):
    cfg = load_config(path, TeacherTrainConfig)
    again = validate_config(TeacherTrainConfig, __import__("yaml").safe_load(dump_config(cfg)))
    assert again == cfg


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "teacher-digits.yaml", TeacherTrainConfig,
                      ["optim.epochs=3", "optim.lr=0.5", "augment.hflip=true", "data.limit=100", "name=other"])
    assert cfg.optim.epochs == 3 and cfg.optim.lr == 0.5 and cfg.augment.hflip is True
    assert cfg.data.limit == 100 and cfg.name == "other"
    # YAML turns these into numbers; the fields are text, so they stay text
    cfg = load_config(CONFIGS / "teacher-digits.yaml", TeacherTrainConfig, ["name=2024", "data.train_split=2017"])
    assert cfg.name == "2024" and cfg.data.train_split == "2017"
    raw = apply_overrides({}, ["a.b.c=[1, 2]"])
    assert raw == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optim.lr=-0.1", "optim.lr = -0.1: Input should be greater than 0"),
        ("optim.schedule=linear", "optim.schedule = 'linear': Input should be 'cosine', 'constant' or 'step'"),
        ("model.arch=resnet35", "no such classifier 'resnet35'; known classifiers: digits_cnn"),
        ("data.dataset=cifar11", "did you mean 'cifar10'"),
        ("optim.epoch=3", "optim.epoch = 3: unknown key (check the spelling; see the allowed keys in configs/ or the schema); "
                          "did you mean 'epochs'?"),
        ("nmae=x", "nmae = 'x': unknown key (check the spelling; see the allowed keys in configs/ or the schema); did you mean 'name'?"),
        ("optim.batch_size=many", "optim.batch_size = 'many': Input should be a valid integer"),
        ("device=tpu", "device = 'tpu': String should match pattern"),
        ("name=has space", "name = 'has space'"),
        ("optim.epochs=true", "optim.epochs = True: Input should be a valid integer"),
        ("optim.epochs=2.5", "optim.epochs = 2.5: Input should be a valid integer"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "teacher-digits.yaml", TeacherTrainConfig, [override])
    assert expected in str(exc.value)


def test_structural_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml", TeacherTrainConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, TeacherTrainConfig)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad, TeacherTrainConfig)
    bad.write_text("name: x\n")
    with pytest.raises(ConfigError, match="data: required field is missing"):
        load_config(bad, TeacherTrainConfig)
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(CONFIGS / "teacher-digits.yaml", TeacherTrainConfig, ["optim.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(CONFIGS / "teacher-digits.yaml", TeacherTrainConfig, ["name.x=1"])


def test_on_off_switches_survive_yaml_booleans():
    """YAML reads `on`/`off` as booleans; `--set channels_last=on` must still mean "on"."""
    from kdci_ray.config import TeacherTrainConfig, apply_overrides, validate_config

    raw = {"name": "t", "data": {"dataset": "digits"}, "model": {"arch": "digits_cnn"}}
    assert validate_config(TeacherTrainConfig, apply_overrides(dict(raw), ["channels_last=on"])).channels_last == "on"
    assert validate_config(TeacherTrainConfig, apply_overrides(dict(raw), ["channels_last=off"])).channels_last == "off"
    with pytest.raises(ConfigError, match="channels_last = 'sometimes'"):
        validate_config(TeacherTrainConfig, apply_overrides(dict(raw), ["channels_last=sometimes"]))


def test_unknown_keys_of_a_method_and_of_optional_sections_get_a_close_match():
    from kdci_ray.config import DistillConfig

    def error(*overrides):
        with pytest.raises(ConfigError) as exc:
            load_config(CONFIGS / "dfnd-digits-digits_cnn-digits_cnn_small.yaml", DistillConfig, list(overrides))
        return str(exc.value)

    assert "num_selct = 3: unknown key for method 'dfnd' (check the spelling); did you mean 'num_select'?" in error("synthesis.num_selct=3")
    assert "kdci.alpah = 1: unknown key" in error("kdci.alpah=1") and "did you mean 'alpha'?" in error("kdci.alpah=1")
    assert "did you mean" not in error("kdci.zzzzzz=1")  # nothing close: no guess


def test_a_missing_relative_config_inside_ray_job_submit_says_where_it_was_looked_for(monkeypatch, tmp_path):
    """`ray job submit --working-dir` runs the job in a temporary copy: a relative --config resolves there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets in a submitted job's driver
    with pytest.raises(ConfigError, match=r"inside `ray job submit` a relative path resolves in the job's temporary copy of "
                                          rf"--working-dir \({tmp_path}\)"):
        load_config("configs/nope.yaml", TeacherTrainConfig)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    with pytest.raises(ConfigError) as exc:
        load_config("configs/nope.yaml", TeacherTrainConfig)
    assert "ray job submit" not in str(exc.value)


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("teacher-", "table-"))),
                         ids=lambda p: p.name)
def test_committed_distill_configs_validate(path):
    from kdci_ray.config import DistillConfig
    from kdci_ray.models import is_external

    cfg = load_config(path, DistillConfig)
    assert cfg.name == path.stem
    for model in (cfg.teacher, cfg.student):  # external specs name models their libraries have
        if is_external(model.arch) and model.arch.startswith("torchvision:"):
            import torchvision

            assert model.arch.split(":", 1)[1] in torchvision.models.list_models(), model.arch


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("table-*.yaml")), ids=lambda p: p.name)
def test_committed_table_configs_list_existing_cells(path):
    from kdci_ray.config import TableConfig
    from kdci_ray.distributed.reproduce import cell_configs

    table = load_config(path, TableConfig)
    cells = cell_configs(table, CONFIGS)
    assert len(cells) == len(table.methods) * len(table.pairs)
    assert all(cfg.data.dataset == table.dataset for cfg in cells.values())
    assert set(table.reference) <= set(table.methods) and all(set(v) <= set(table.pairs) for v in table.reference.values())


def test_every_tables_public_numbers_match_the_committed_source_table():
    """configs/table-*.yaml `reference` / `reference_teacher` against docs/reference_numbers.csv (each row names its
    source): no number in a table without a source, and no source row missing from its table."""
    import csv

    from kdci_ray.config import TableConfig, load_config

    root = Path(__file__).resolve().parents[1]
    source = {(r["dataset"], r["method"], r["pair"]): (float(r["top1"]), float(r["teacher_top1"]))
              for r in csv.DictReader(open(root / "docs" / "reference_numbers.csv"))}
    assert all(r for r in csv.DictReader(open(root / "docs" / "reference_numbers.csv")) if r["source"])
    in_tables = {}
    for path in sorted((root / "configs").glob("table-*.yaml")):
        table = load_config(path, TableConfig)
        for method, pairs in table.reference.items():
            for pair, top1 in pairs.items():
                in_tables[(table.dataset, method, pair)] = (top1, table.reference_teacher[method][pair])
    assert in_tables == source
    assert source[("cifar10", "cmi", "wrn40_2-wrn16_1")][0] == 88.82  # the from-scratch recipe, not adversarial CMI's 90.01
