"""The run config: TOML + ``--set`` text become one frozen, typed object, or a ConfigError naming the key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from recsys.config import Config, DataConfig, EvalConfig, ModelConfig, load_config, section_dict, to_toml
from recsys.errors import ConfigError


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


# --- --set text is read as the annotated type


def test_set_reads_an_int_key_as_an_int() -> None:
    epochs = load_config(None, ["train.epochs=1"]).train.epochs
    assert epochs == 1 and type(epochs) is int


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False), ("on", True), ("off", False), ("TRUE", True),
])
def test_set_reads_bool_words(text: str, expected: bool) -> None:
    assert load_config(None, [f"model.use_text={text}"]).model.use_text is expected


def test_set_reads_a_comma_separated_tuple() -> None:
    cfg = load_config(None, ["model.tasks=click, rating", "eval.ks=5,10"])
    assert cfg.model.tasks == ("click", "rating")
    assert cfg.eval.ks == (5, 10)


@pytest.mark.parametrize("text", ["none", "null", "NONE", ""])
def test_set_reads_none_words_as_none_for_an_optional_key(text: str) -> None:
    assert load_config(None, [f"data.conversion_from_rating={text}"]).data.conversion_from_rating is None


def test_none_is_an_ordinary_string_for_a_string_key() -> None:
    assert load_config(None, ["embed.text_model=none"]).embed.text_model == "none"


def test_a_float_key_accepts_an_integer() -> None:
    lr = load_config(None, ["train.lr=1"]).train.lr
    assert lr == 1.0 and type(lr) is float


@pytest.mark.parametrize("text", ["1.5", "true", "many"])
def test_an_int_key_rejects_fractions_bools_and_words_naming_the_key_and_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=rf"--set 'train.epochs={text}': config key 'train.epochs'"):
        load_config(None, [f"train.epochs={text}"])


def test_a_float_key_rejects_a_bool() -> None:
    with pytest.raises(ConfigError, match="config key 'train.lr'"):
        load_config(None, ["train.lr=true"])


def test_a_literal_key_rejects_other_values_and_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"config key 'index.kind'.*'flat'.*'hnsw'.*got 'bogus'"):
        load_config(None, ["index.kind=bogus"])


def test_tasks_may_only_name_known_heads() -> None:
    with pytest.raises(ConfigError, match=r"config key 'model.tasks'.*got 'clik'"):
        load_config(None, ["model.tasks=click,clik"])


def test_set_without_a_dotted_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["epochs=1"])


# --- TOML files


def test_toml_values_override_defaults_and_set_overrides_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[train]\nepochs = 2\nlr = 0.5\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert (cfg.train.epochs, cfg.train.lr) == (3, 0.5)


def test_a_wrong_type_in_toml_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[train]\nepochs = "many"\n')
    with pytest.raises(ConfigError, match=rf"{path}: config key 'train.epochs'.*got 'many'"):
        load_config(path)


def test_a_toml_bool_is_not_an_int(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[train]\nepochs = true\n")
    with pytest.raises(ConfigError, match="config key 'train.epochs': true/false is only valid for on/off keys"):
        load_config(path)


def test_a_toml_float_with_a_fraction_is_not_an_int(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[train]\nepochs = 1.5\n")
    with pytest.raises(ConfigError, match="config key 'train.epochs'"):
        load_config(path)


def test_an_unknown_key_lists_the_known_keys_of_its_section(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[train]\nepoch = 2\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown config key 'train.epoch' \(known in \[train\]: epochs, batch_size"):
        load_config(path)


def test_an_unknown_section_lists_the_known_sections() -> None:
    with pytest.raises(ConfigError, match=r"--set 'trian.epochs=2': unknown config section 'trian' \(known: data, embed, model, train"):
        load_config(None, ["trian.epochs=2"])


def test_a_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write_toml(tmp_path, "[train\n"))


# --- limits and checks across keys


@pytest.mark.parametrize("override", [
    "model.dim=0", "train.epochs=0", "train.batch_size=1", "train.temperature=0", "data.history_len=0", "data.test_fraction=0",
    "model.modality_dropout=1", "index.target_recall=1.5", "index.hnsw_m=3", "serve.max_k=0", "eval.ks=10,0",
])
def test_a_value_outside_its_limits_names_the_key(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        load_config(None, [override])


def test_rating_min_must_be_below_rating_max_naming_both_keys_and_the_source(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[data]\nrating_min = 9.0\n")
    with pytest.raises(ConfigError, match=rf"{path}: data.rating_min \(9.0\) must be below data.rating_max \(5.0\)"):
        load_config(path)


def test_valid_and_test_fractions_must_leave_rows_for_training() -> None:
    with pytest.raises(ConfigError, match="data.valid_fraction \\+ data.test_fraction must be below 1"):
        load_config(None, ["data.valid_fraction=0.5", "data.test_fraction=0.5"])


def test_every_bad_key_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.epochs=0", "model.dim=x"])
    assert "train.epochs" in str(caught.value) and "model.dim" in str(caught.value)


# --- the resolved object


def test_to_toml_round_trips_through_load_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.conversion_from_rating=none", "model.tasks=click,rating", "eval.ks=5", "train.lr=0.5", "model.use_text=false"])
    text = to_toml(cfg)
    assert 'conversion_from_rating = "none"' in text
    assert load_config(write_toml(tmp_path, text)) == cfg


def test_digest_is_the_hash_of_the_sorted_json_of_to_dict() -> None:
    cfg = Config()
    assert cfg.digest() == hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.to_dict()["eval"]["ks"] == [10, 20, 50, 100]


def test_digest_changes_with_a_value_and_not_otherwise() -> None:
    assert load_config().digest() == Config().digest()
    assert load_config(None, ["train.epochs=1"]).digest() != Config().digest()


def test_replace_applies_dotted_overrides_and_keeps_the_rest() -> None:
    base = load_config(None, ["model.dim=16"])
    changed = base.replace(**{"train.epochs": "2"})
    assert (changed.train.epochs, changed.model.dim) == (2, 16)
    assert base.train.epochs == 20


def test_sections_are_built_from_keyword_args_with_lists_as_tuples() -> None:
    model = ModelConfig(dim=16, tasks=["click"])
    assert model.tasks == ("click",) and model.dim == 16
    assert model == ModelConfig(dim=16, tasks=("click",)) and hash(model) == hash(ModelConfig(dim=16, tasks=("click",)))


def test_sections_are_frozen() -> None:
    with pytest.raises(ValidationError, match="frozen"):
        Config().train.epochs = 2  # type: ignore[misc]


def test_section_dict_is_json_with_tuples_as_lists() -> None:
    assert section_dict(EvalConfig(ks=(5,)))["ks"] == [5]
    assert json.loads(json.dumps(section_dict(DataConfig()))) == section_dict(DataConfig())
