"""Config validation: every error names its field."""
from __future__ import annotations

import pytest

from fedhq_core.config import ConfigError, ExperimentConfig, from_mapping, load_config, validate


def test_defaults_are_valid():
    cfg = validate(ExperimentConfig())
    assert cfg.dataset == "digits" and cfg.clients == 20 and cfg.alpha == 0.5
    assert (cfg.w_bits, cfg.a_bits) == (4, 8)


@pytest.mark.parametrize("values,field", [
    ({"dataset": "mnist"}, "dataset"),
    ({"w_bits": 1}, "w_bits"),
    ({"a_bits": 9}, "a_bits"),
    ({"rounds": 0}, "rounds"),
    ({"fraction": 0.0}, "fraction"),
    ({"fraction": 1.5}, "fraction"),
    ({"colour": "red"}, "colour"),
    ({"clients": "many"}, "clients"),
    ({"dataset": "cifar10-folder"}, "data_dir"),
    ({"dataset": "cifar10-folder", "data_dir": "/no/such/dir"}, "data_dir"),
    ({"fleet": {"abacus": 1.0}}, "fleet"),
    ({"xi": 2}, "xi"),
    ({"replicate": -1}, "replicate"),
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"online_statistic": "loss"}, "online_statistic"),
    ({"val_fraction": 0.6}, "val_fraction"),
    ({"eval_every": 2, "test_every": 3}, "test_every"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ConfigError) as err:
        from_mapping(values)
    assert str(err.value).startswith(f"{field}:")
    assert "\n" not in str(err.value)


def test_yaml_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rounds: 3\nw_bits: 2\n")
    cfg = load_config(str(p), {"rounds": 5, "seed": None})
    assert cfg.rounds == 5 and cfg.w_bits == 2 and cfg.seed == 0


def test_yaml_syntax_error_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: YAML syntax error"):
        load_config(str(p))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"))


def test_dataset_defaults_apply_only_to_unset_keys(tmp_path):
    cfg = load_config(None, {"dataset": "cifar10-folder", "data_dir": str(tmp_path), "rounds": 4})
    assert cfg.max_train_samples == 10000 and cfg.batch_size == 32 and cfg.rounds == 4
    assert load_config(None, {}).max_train_samples == 0


def test_credentials_are_redacted_from_uris():
    from fedhq_core.config import ExperimentConfig, redact_uri

    assert redact_uri("http://me:hunter2@host:5000/x") == "http://***@host:5000/x"
    assert redact_uri("https://h/api?token=abc&page=2&X-Amz-Signature=s") == "https://h/api?token=***&page=2&X-Amz-Signature=***"
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db" and redact_uri(None) is None
    public = ExperimentConfig(tracking_uri="http://me:hunter2@h/", dask_address="tcp://u:p@h:8786").public_dict()
    assert "hunter2" not in str(public) and ":p@" not in str(public)


def test_cosine_schedule_runs_from_lr_to_its_floor():
    cfg = ExperimentConfig(rounds=5, lr=0.1, lr_schedule="cosine", lr_final=0.1)
    lrs = [cfg.round_lr(r) for r in range(5)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.055)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert ExperimentConfig(rounds=5, lr=0.1).round_lr(4) == 0.1        # constant by default
    held = ExperimentConfig(rounds=10, lr=0.1, lr_schedule="cosine", lr_final=0.1, lr_hold=0.2)
    assert [held.round_lr(r) for r in (0, 7, 8, 9)] == pytest.approx([0.1, 0.01, 0.01, 0.01])
    assert held.round_lr(6) > 0.01
