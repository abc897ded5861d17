"""IPUConfig: schema and defaults, load/save, per-pod values, deprecated keys, overrides, validation, layer maps."""
import json
import logging
import os

import pytest

from ipu_train import IPUConfig
from ipu_train.arguments import IPUTrainingArguments
from ipu_train.config import FIELDS, IPUConfigError
from ipu_train.errors import UserError
from ipu_train.trainer import IPUTrainer

from ._trainer_fixtures import collate, tiny_gpt2, token_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "ipu_configs")


# --- schema and defaults -------------------------------------------------------------------------------------

CURRENT_DEFAULTS = {
    "layers_per_ipu": [-1],
    "ipus_per_replica": 1,
    "replication_factor": 1,
    "inference_replication_factor": 1,
    "gradient_accumulation_steps": 1,
    "device_iterations": 1,
    "inference_device_iterations": 1,
    "optimizer_state_offchip": False,
    "replicated_tensor_sharding": False,
    "matmul_proportion": 0.2,
    "enable_half_partials": True,
    "embedding_serialization_factor": 1,
    "projection_serialization_factor": 1,
    "serialized_embedding_splits_per_ipu": None,
    "serialized_projection_splits_per_ipu": None,
    "recompute_checkpoint_every_layer": False,
    "output_mode": "final",
    "seed": None,
    "auto_loss_scaling": False,
    "executable_cache_dir": "",
    "explicit_ir_inference": False,
    "parallelize_kwargs": {},
}


def test_every_attribute_has_its_documented_default():
    config = IPUConfig()
    for name, default in CURRENT_DEFAULTS.items():
        assert getattr(config, name) == default, name
    inference_variants = [name for name in FIELDS if name.startswith("inference_")]
    assert len(inference_variants) == 10
    assert set(FIELDS) == set(CURRENT_DEFAULTS) | set(inference_variants)


def test_every_field_is_declared_on_the_class_with_a_type_and_a_one_line_doc():
    assert list(FIELDS) == [name for name in IPUConfig.__annotations__]
    for name, field in FIELDS.items():
        assert getattr(IPUConfig, name) is field and field.__doc__ and "\n" not in field.__doc__, name


def test_inference_variants_follow_the_training_values_until_set():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], matmul_proportion=0.3, embedding_serialization_factor=2,
                       parallelize_kwargs={"use_cache": False})
    assert config.inference_layers_per_ipu == [0, 4, 4, 4]
    assert config.inference_ipus_per_replica == 4
    assert config.inference_matmul_proportion == 0.3
    assert config.inference_embedding_serialization_factor == 2
    assert config.inference_parallelize_kwargs == {"use_cache": False}
    # Never set, so an override of the training layout moves the inference layout too.
    config.update_from_string("layers_per_ipu=[2 10]")
    assert config.inference_layers_per_ipu == [2, 10] and config.inference_ipus_per_replica == 2
    config.update_from_string("inference_layers_per_ipu=[-1 -1 -1]")
    assert config.inference_ipus_per_replica == 3 and config.ipus_per_replica == 2


def test_eval_mode_reads_and_writes_the_inference_layout():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], inference_layers_per_ipu=[6, 6],
                       matmul_proportion=[0.1, 0.2, 0.2, 0.2])
    assert config.mode == "training"
    assert config.eval() is config and config.mode == "inference"
    assert config.layers_per_ipu == [6, 6]
    assert config.ipus_per_replica == 2
    assert config.matmul_proportion == 0.2  # a 4-entry list cannot serve 2 IPUs: the fallback
    config.embedding_serialization_factor = 3
    assert config.inference_embedding_serialization_factor == 3
    assert config.train().embedding_serialization_factor == 1
    assert config.layers_per_ipu == [0, 4, 4, 4]



def test_in_mode_switches_for_a_block_and_restores_the_previous_mode_errors_included():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], inference_layers_per_ipu=[7])
    with config.in_mode("inference") as inside:
        assert inside is config and config.mode == "inference" and config.layers_per_ipu == [7]
        with config.in_mode("training"):
            assert config.layers_per_ipu == [0, 4, 4, 4]
        assert config.mode == "inference"
    assert config.mode == "training"
    with pytest.raises(IPUConfigError, match=r"^inference_layers_per_ipu=\[7\] places 7 layers"):
        with config.in_mode("inference"):
            config.layer_stages(12)
    assert config.mode == "training"
    config.eval()
    with pytest.raises(KeyError):
        with config.in_mode("training"):
            raise KeyError
    assert config.mode == "inference"


def test_in_mode_validates_before_switching_and_refuses_an_unknown_mode():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4])
    config.ipus_per_replica = 2
    with pytest.raises(IPUConfigError, match="has 4 entries but ipus_per_replica=2"):
        with config.in_mode("inference"):
            pass
    assert config.mode == "training"
    with pytest.raises(ValueError, match="mode 'eval' is not one of training, inference"):
        with IPUConfig().in_mode("eval"):
            pass


def test_evaluation_loop_raising_leaves_the_config_in_training_mode(tmp_path):
    config = IPUConfig(inference_device_iterations=2)
    modes = []

    def failing_collator(rows):
        modes.append(config.mode)
        if len(modes) == 2:
            raise RuntimeError("collator failed")
        return collate(rows)

    args = IPUTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none",
                                disable_tqdm=True, device_type="cpu")
    trainer = IPUTrainer(model=tiny_gpt2(), ipu_config=config, args=args, data_collator=failing_collator,
                         eval_dataset=token_rows(12))
    with pytest.raises(RuntimeError, match="collator failed"):
        trainer.evaluate()
    assert modes == ["inference", "inference"] and config.mode == "training"

def test_inference_ipus_per_replica_rules_of_the_original():
    assert IPUConfig(layers_per_ipu=[0, 4, 4, 4], inference_layers_per_ipu=[-1]).inference_ipus_per_replica == 1
    # A bare [-1] keeps a training width set apart from layers_per_ipu.
    assert IPUConfig(ipus_per_replica=4, inference_layers_per_ipu=[-1]).inference_ipus_per_replica == 4
    assert IPUConfig(ipus_per_replica=4).inference_ipus_per_replica == 4
    assert IPUConfig(layers_per_ipu=[-1, -1], inference_ipus_per_replica=1).inference_ipus_per_replica == 1


def test_inference_serialization_defaults():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], serialized_embedding_splits_per_ipu=[2, 2, 0, 0])
    assert config.inference_serialized_embedding_splits_per_ipu == [2, 2, 0, 0]
    assert config.inference_embedding_serialization_factor == 1
    # The splits do not fit a 2-IPU inference pipeline: as many parts on one IPU instead.
    config.update_from_string("inference_layers_per_ipu=[6 6]")
    assert config.inference_serialized_embedding_splits_per_ipu is None
    assert config.inference_embedding_serialization_factor == 4
    config.update_from_string("inference_embedding_serialization_factor=2")
    assert config.inference_serialized_embedding_splits_per_ipu is None
    assert config.inference_embedding_serialization_factor == 2


def test_attribute_assignment_is_validated_and_leaves_the_config_unchanged_on_error():
    config = IPUConfig(replication_factor=2)
    with pytest.raises(IPUConfigError, match="replication_factor=0 must be at least 1"):
        config.replication_factor = 0
    assert config.replication_factor == 2
    config.replication_factor = 3
    assert config.replication_factor == 3


@pytest.mark.parametrize("name, value, text, message", [
    ("gradient_accumulation_steps", 0, "0", "^gradient_accumulation_steps=0 must be at least 1$"),
    ("layers_per_ipu", [-2], "[-2]", r"^layers_per_ipu=\[-2\]: entries must be layer counts >= 0, or -1"),
    ("matmul_proportion", -0.1, "-0.1", "^matmul_proportion=-0.1 must be >= 0"),
    ("output_mode", "every", "every", "^output_mode='every' must be one of all, sum, final, default$"),
    ("serialized_embedding_splits_per_ipu", [3, 0, 2, 0], "[3 0 2 0]",
     r"^serialized_embedding_splits_per_ipu=\[3, 0, 2, 0\]: the IPUs holding splits must be consecutive"),
])
def test_a_field_alone_is_checked_when_assigned_with_the_message_of_an_override(name, value, text, message):
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4])
    with pytest.raises(IPUConfigError, match=message):
        setattr(config, name, value)
    assert config == IPUConfig(layers_per_ipu=[0, 4, 4, 4])
    with pytest.raises(IPUConfigError, match=message):
        config.update_from_string(f"{name}={text}")


def test_an_assignment_checks_the_type_and_in_eval_mode_names_the_inference_field():
    config = IPUConfig()
    with pytest.raises(IPUConfigError, match="^replication_factor must be an integer, not 2.5$"):
        config.replication_factor = 2.5
    with pytest.raises(IPUConfigError, match=r"^inference_layers_per_ipu=\[-2\]: entries must be layer counts"):
        config.eval().layers_per_ipu = [-2]
    assert config == IPUConfig()


def test_fields_assigned_one_at_a_time_may_pass_through_inconsistent_states():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], ipus_per_replica=4, matmul_proportion=[0.1, 0.2, 0.2, 0.2],
                       serialized_embedding_splits_per_ipu=[1, 1, 0, 0])
    config.layers_per_ipu = [6, 6]  # 2 entries for 4 IPUs, until the next three lines
    config.ipus_per_replica = 2
    config.matmul_proportion = [0.1, 0.2]
    config.serialized_embedding_splits_per_ipu = [1, 1]
    assert config.validate() is config
    assert config.layer_stages(12) == [0] * 6 + [1] * 6
    config.embedding_serialization_factor = 4  # a factor and splits, until the splits are cleared
    config.serialized_embedding_splits_per_ipu = None
    config.layers_per_ipu = [3]  # as optimum-graphcore code narrows a layout to one IPU
    config.ipus_per_replica = 1
    config.matmul_proportion = 0.2
    assert config.eval().layer_stages(3) == [0, 0, 0] and config.inference_embedding_serialization_factor == 4
    assert IPUConfig(**config.to_dict()) == config


INCONSISTENT = [
    ({"ipus_per_replica": 2},
     r"^layers_per_ipu=\[0, 4, 4, 4\] has 4 entries but ipus_per_replica=2: give one entry per IPU, or set "
     r"ipus_per_replica=4$"),
    ({"matmul_proportion": [0.1, 0.2]},
     r"^matmul_proportion=\[0.1, 0.2\] has 2 entries but ipus_per_replica=4: give one value per IPU"),
    ({"serialized_embedding_splits_per_ipu": [0, 2, 2, 0], "embedding_serialization_factor": 4},
     r"^set only one of embedding_serialization_factor=4 and serialized_embedding_splits_per_ipu=\[0, 2, 2, 0\]"),
]


@pytest.mark.parametrize("assignments, message", INCONSISTENT)
def test_an_inconsistent_assignment_fails_before_the_configuration_is_used(tmp_path, assignments, message):
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4])
    for name, value in assignments.items():
        setattr(config, name, value)
    uses = [config.validate, lambda: config.layer_stages(12), lambda: config.layers_per_stage(12),
            config.batch_size_factor, config.eval, config.train, lambda: config.apply_n_ipu(8),
            lambda: config.save_pretrained(tmp_path), lambda: config.update(seed=1)]
    for use in uses:
        with pytest.raises(IPUConfigError, match=message):
            use()
    assert config.mode == "training" and config.seed is None and not os.listdir(tmp_path)


def test_assigning_an_unknown_attribute_names_the_nearest_key(caplog):
    config = IPUConfig()
    with pytest.raises(IPUConfigError, match="unknown key 'layer_per_ipu'; did you mean 'layers_per_ipu'"):
        config.layer_per_ipu = [3]
    with caplog.at_level(logging.WARNING, logger="ipu_train"):
        config.use_popdist = True  # as in update(): a deprecated key warns and is ignored
    assert not hasattr(config, "layer_per_ipu") and not hasattr(config, "use_popdist")
    assert any("'use_popdist' is deprecated" in record.getMessage() for record in caplog.records)


def test_error_type_is_a_user_error_and_a_value_error():
    with pytest.raises(UserError):
        IPUConfig(device_iterations=0)
    with pytest.raises(ValueError):
        IPUConfig(device_iterations=0)


# --- loading and saving --------------------------------------------------------------------------------------


def _write(path, values):
    path.write_text(json.dumps(values))
    return str(path)


def test_from_pretrained_directory_file_and_overrides(tmp_path):
    (tmp_path / "model").mkdir()
    _write(tmp_path / "model" / "ipu_config.json", {"layers_per_ipu": [1, 1], "gradient_accumulation_steps": 8})
    from_dir = IPUConfig.from_pretrained(tmp_path / "model")
    from_file = IPUConfig.from_pretrained(str(tmp_path / "model" / "ipu_config.json"))
    assert from_dir == from_file and from_dir.gradient_accumulation_steps == 8
    overridden = IPUConfig.from_pretrained(tmp_path / "model", gradient_accumulation_steps=2, seed=7)
    assert (overridden.gradient_accumulation_steps, overridden.seed, overridden.layers_per_ipu) == (2, 7, [1, 1])


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(IPUConfigError, match="holds no ipu_config.json"):
        IPUConfig.from_pretrained(tmp_path)
    with pytest.raises(IPUConfigError, match="missing.json does not exist"):
        IPUConfig.from_pretrained(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"layers_per_ipu": [1, 2,]}')
    with pytest.raises(IPUConfigError, match="broken.json is not valid JSON"):
        IPUConfig.from_pretrained(str(broken))
    with pytest.raises(IPUConfigError, match="one JSON object"):
        IPUConfig.from_pretrained(_write(tmp_path / "list.json", [1, 2]))
    with pytest.raises(IPUConfigError, match=r"bad.json: matmul_proportion must be a float or a list of floats"):
        IPUConfig.from_pretrained(_write(tmp_path / "bad.json", {"matmul_proportion": "high"}))


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(IPUConfigError) as error:
        IPUConfig.from_pretrained("no-such-user/no-such-ipu-config")
    message = str(error.value)
    assert "'no-such-user/no-such-ipu-config' is not a local directory or .json file" in message
    assert "offline (HF_HUB_OFFLINE=1)" in message
    assert "\n" not in message


def test_round_trip_is_exact(tmp_path):
    config = IPUConfig(
        layers_per_ipu=[0, -1, 4, -1],
        inference_layers_per_ipu=[6, 6],
        matmul_proportion=[0.1, 0.2, 0.25, 0.25],
        serialized_projection_splits_per_ipu=[0, 0, 1, 1],
        parallelize_kwargs={"use_cache": False, "nested": {"a": [1, 2]}},
        seed=42,
        output_mode="all",
        executable_cache_dir="/tmp/cache",
    ).eval()
    path = config.save_pretrained(tmp_path / "out")
    assert path == str(tmp_path / "out" / "ipu_config.json")
    loaded = IPUConfig.from_pretrained(tmp_path / "out")
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()
    assert loaded.to_json_string() == config.to_json_string()
    assert json.loads(config.to_json_string()) == config.to_dict()
    assert IPUConfig(**config.to_dict()) == config
    assert "mode" not in config.to_dict()
    assert loaded.mode == "training"


def test_to_dict_returns_a_copy():
    config = IPUConfig(layers_per_ipu=[1, 2])
    config.to_dict()["layers_per_ipu"].append(9)
    config.layers_per_ipu.append(9)
    assert config.layers_per_ipu == [1, 2]


def test_older_files_load_with_their_explicit_values(tmp_path):
    older = {
        "layers_per_ipu": [1],
        "matmul_proportion": 0.6,
        "optimizer_state_offchip": True,
        "enable_half_partials": False,
        "embedding_serialization_factor": None,
        "parallelize_kwargs": None,
        "optimum_version": "1.0.0",
        "transformers_version": "4.29.2",
    }
    config = IPUConfig.from_pretrained(_write(tmp_path / "old.json", older))
    assert (config.matmul_proportion, config.optimizer_state_offchip, config.enable_half_partials) == (0.6, True, False)
    assert config.embedding_serialization_factor == 1 and config.parallelize_kwargs == {}
    assert "optimum_version" not in config.to_dict()


# --- deprecated and unknown keys -----------------------------------------------------------------------------

DEPRECATED = ["enable_half_first_order_momentum", "sharded_execution_for_inference", "use_popdist", "profile_dir",
              "decompose_grad_sum"]


def test_deprecated_keys_warn_once_each(tmp_path, caplog):
    path = _write(tmp_path / "old.json", {**{key: True for key in DEPRECATED}, "layers_per_ipu": [1, 2]})
    with caplog.at_level(logging.WARNING, logger="ipu_train"):
        config = IPUConfig.from_pretrained(path)
    warnings = [record.getMessage() for record in caplog.records if record.name == "ipu_train"]
    for key in DEPRECATED:
        assert sum(f"'{key}'" in message for message in warnings) == 1, key
    assert len(warnings) == len(DEPRECATED)
    assert not set(DEPRECATED) & set(config.to_dict())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ipu_train"):
        config.for_pod_type(None)  # resolving does not repeat the warnings
    assert not caplog.records


@pytest.mark.parametrize("typo, nearest", [
    ("layer_per_ipu", "layers_per_ipu"),
    ("replication_factr", "replication_factor"),
    ("inference_device_iteration", "inference_device_iterations"),
    ("matmul_proportions", "matmul_proportion"),
])
def test_unknown_keys_name_the_nearest_valid_key(tmp_path, typo, nearest):
    with pytest.raises(IPUConfigError, match=f"unknown key '{typo}'; did you mean '{nearest}'"):
        IPUConfig.from_pretrained(_write(tmp_path / "c.json", {typo: 1}))
    with pytest.raises(IPUConfigError, match=f"unknown key '{typo}'; did you mean '{nearest}'"):
        IPUConfig().update_from_string(f"{typo}=1")


# --- per-pod values ------------------------------------------------------------------------------------------

PER_POD = {
    "layers_per_ipu": [0, 4, 4, 4],
    "replication_factor": {"pod4": 1, "pod8": 2, "pod16": 4, "pod32": 8, "pod64": 16, "default": 1},
    "gradient_accumulation_steps": {"pod16": 64, "pod64": 16, "default": 128},
}


def test_per_pod_values_resolve_by_pod_type(tmp_path):
    config = IPUConfig.from_pretrained(_write(tmp_path / "pods.json", PER_POD))
    pod16 = config.for_pod_type("pod16")
    assert (pod16.replication_factor, pod16.gradient_accumulation_steps) == (4, 64)
    default = config.for_pod_type()
    assert (default.replication_factor, default.gradient_accumulation_steps) == (1, 128)
    assert config.replication_factor == PER_POD["replication_factor"]  # a new object; the source is unchanged
    assert pod16.for_pod_type("pod16") == pod16


def test_per_pod_errors():
    config = IPUConfig(**PER_POD)
    with pytest.raises(IPUConfigError, match="--pod_type pod7 is not a pod type: use one of pod4, pod8, pod16"):
        config.for_pod_type("pod7")
    with pytest.raises(IPUConfigError, match="gradient_accumulation_steps has no value for --pod_type pod4: use one of "
                                             "pod16, pod64"):
        config.for_pod_type("pod4")
    no_default = IPUConfig(replication_factor={"pod16": 4, "pod64": 16})
    with pytest.raises(IPUConfigError, match='replication_factor has per-pod values for pod16, pod64 and no "default": '
                                             "pass --pod_type"):
        no_default.for_pod_type()
    with pytest.raises(IPUConfigError, match="replication_factor still holds per-pod values"):
        config.batch_size_factor()
    with pytest.raises(IPUConfigError, match="replication_factor still holds per-pod values"):
        config.layer_stages(12)
    with pytest.raises(IPUConfigError, match="replication_factor=0 must be at least 1"):
        IPUConfig(replication_factor={"pod4": 0, "default": 1})
    with pytest.raises(IPUConfigError, match="replication_factor must be an integer"):
        IPUConfig(replication_factor={"pod4": "two", "default": 1})


def test_relations_are_validated_once_a_pod_type_is_chosen():
    config = IPUConfig(layers_per_ipu={"pod4": [0, 4, 4, 4], "pod16": [6, 6], "default": [0, 4, 4, 4]},
                       matmul_proportion=[0.1, 0.2, 0.2, 0.2])
    assert config.for_pod_type("pod4").ipus_per_replica == 4
    with pytest.raises(IPUConfigError, match=r"matmul_proportion=\[0.1, 0.2, 0.2, 0.2\] has 4 entries but "
                                             r"ipus_per_replica=2"):
        config.for_pod_type("pod16")


# --- string overrides ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[1 3 4 4]", "[1,3,4,4]", "[1, 3, 4, 4]", " [ 1 3,4  4 ] "])
def test_override_lists_with_spaces_or_commas(text):
    config = IPUConfig().update_from_string(f"layers_per_ipu={text},gradient_accumulation_steps=4")
    assert config.layers_per_ipu == [1, 3, 4, 4] and config.gradient_accumulation_steps == 4


def test_override_uses_declared_types():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4])
    config.update_from_string("matmul_proportion=[0.08 0.2 0.25 0.25]")  # a float field takes a list
    assert config.matmul_proportion == [0.08, 0.2, 0.25, 0.25]
    config.update_from_string("matmul_proportion=1")  # and a float again, written as an integer
    assert config.matmul_proportion == 1.0 and isinstance(config.matmul_proportion, float)
    config.update_from_string("seed=5")  # a null field can be set...
    assert config.seed == 5
    config.update_from_string("seed=null,inference_layers_per_ipu=[6 6]")  # ...and cleared
    assert config.seed is None and config.inference_layers_per_ipu == [6, 6]
    config.update_from_string("output_mode=all,executable_cache_dir=/tmp/x y")
    assert (config.output_mode, config.executable_cache_dir) == ("all", "/tmp/x y")
    config.update_from_string('parallelize_kwargs={"use_cache": false, "k": [1, 2]}')
    assert config.parallelize_kwargs == {"use_cache": False, "k": [1, 2]}


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("y", True),
    ("false", False), ("FALSE", False), ("0", False), ("no", False), ("n", False),
])
def test_override_booleans(text, expected):
    config = IPUConfig(recompute_checkpoint_every_layer=not expected)
    config.update_from_string(f"recompute_checkpoint_every_layer={text}")
    assert config.recompute_checkpoint_every_layer is expected


def test_override_whitespace_and_empty_items_are_tolerated():
    config = IPUConfig().update_from_string("  replication_factor = 2 ,\tdevice_iterations= 3 , ,")
    assert (config.replication_factor, config.device_iterations) == (2, 3)


@pytest.mark.parametrize("item, message", [
    ("replication_factor=2.5", "replication_factor=2.5 is not valid, replication_factor must be an integer"),
    ("replication_factor=null", "replication_factor must be an integer"),
    ("seed=abc", "seed must be an integer or null"),
    ("auto_loss_scaling=maybe", "auto_loss_scaling must be a boolean"),
    ("matmul_proportion=high", "matmul_proportion must be a float or a list of floats"),
    ("matmul_proportion=[0.1 x]", "matmul_proportion must be a float or a list of floats"),
    ("layers_per_ipu=1 2", "layers_per_ipu must be a list of integers"),
    ("layers_per_ipu=[]", "layers_per_ipu must be a list of integers"),
    ("layers_per_ipu=[1.5 2]", "layers_per_ipu must be a list of integers"),
    ("parallelize_kwargs={oops}", "parallelize_kwargs must be a JSON object"),
    ("parallelize_kwargs=[1]", "parallelize_kwargs must be a JSON object"),
    ("replication_factor", "'replication_factor' is not key=value"),
])
def test_override_errors_name_the_key_and_the_expected_type(item, message):
    config = IPUConfig()
    with pytest.raises(IPUConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.update_from_string(item)
    assert config == IPUConfig()


def test_overrides_are_validated_and_applied_all_or_nothing():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4])
    with pytest.raises(IPUConfigError, match="matmul_proportion=.* has 3 entries but ipus_per_replica=4"):
        config.update_from_string("gradient_accumulation_steps=8,matmul_proportion=[0.1 0.2 0.2]")
    assert config.gradient_accumulation_steps == 1
    # Changing layout and width together is one change, valid as a whole.
    config.update_from_string("layers_per_ipu=[6 6],matmul_proportion=[0.1 0.2]")
    assert config.ipus_per_replica == 2


def test_override_of_a_deprecated_key_warns_and_is_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="ipu_train"):
        config = IPUConfig().update_from_string("use_popdist=true,seed=3")
    assert config.seed == 3
    assert any("'use_popdist' is deprecated" in record.getMessage() for record in caplog.records)


# --- validation: one test per rule, each message says what to change ------------------------------------------

COUNT_FIELDS = ["replication_factor", "inference_replication_factor", "gradient_accumulation_steps",
                "device_iterations", "inference_device_iterations", "ipus_per_replica", "inference_ipus_per_replica",
                "embedding_serialization_factor", "inference_embedding_serialization_factor",
                "projection_serialization_factor", "inference_projection_serialization_factor"]


@pytest.mark.parametrize("name", COUNT_FIELDS)
def test_counts_and_factors_are_at_least_one(name):
    with pytest.raises(IPUConfigError, match=f"^{name}=0 must be at least 1$"):
        IPUConfig(**{name: 0})


@pytest.mark.parametrize("name", ["layers_per_ipu", "inference_layers_per_ipu"])
def test_layers_per_ipu_entries_are_at_least_minus_one(name):
    with pytest.raises(IPUConfigError, match=rf"{name}=\[2, -2\]: entries must be layer counts >= 0, or -1"):
        IPUConfig(**{name: [2, -2]})


@pytest.mark.parametrize("name", ["matmul_proportion", "inference_matmul_proportion"])
def test_matmul_proportion_is_not_negative(name):
    with pytest.raises(IPUConfigError, match=f"{name}=-0.1 must be >= 0"):
        IPUConfig(**{name: -0.1})
    with pytest.raises(IPUConfigError, match=rf"{name}=\[0.2, -0.1\] must be >= 0"):
        IPUConfig(layers_per_ipu=[1, 1], **{name: [0.2, -0.1]})


def test_matmul_proportion_list_has_one_entry_per_ipu():
    with pytest.raises(IPUConfigError, match=r"^matmul_proportion=\[0.1, 0.2\] has 2 entries but ipus_per_replica=4: "
                                             r"give one value per IPU, or a single float$"):
        IPUConfig(layers_per_ipu=[0, 4, 4, 4], matmul_proportion=[0.1, 0.2])
    with pytest.raises(IPUConfigError, match=r"^inference_matmul_proportion=\[0.1, 0.2, 0.2\] has 3 entries but "
                                             r"inference_ipus_per_replica=4"):
        IPUConfig(layers_per_ipu=[0, 4, 4, 4], inference_matmul_proportion=[0.1, 0.2, 0.2])


def test_layers_per_ipu_without_wildcards_has_one_entry_per_ipu():
    with pytest.raises(IPUConfigError, match=r"^layers_per_ipu=\[4, 8\] has 2 entries but ipus_per_replica=4: give "
                                             r"one entry per IPU, or set ipus_per_replica=2$"):
        IPUConfig(layers_per_ipu=[4, 8], ipus_per_replica=4)
    with pytest.raises(IPUConfigError, match=r"^inference_layers_per_ipu=\[4, 8\] has 2 entries but "
                                             r"inference_ipus_per_replica=3"):
        IPUConfig(inference_layers_per_ipu=[4, 8], inference_ipus_per_replica=3)


def test_output_mode_is_one_of_the_four():
    with pytest.raises(IPUConfigError, match="output_mode='every' must be one of all, sum, final, default"):
        IPUConfig(output_mode="every")


@pytest.mark.parametrize("prefix", ["", "inference_"])
@pytest.mark.parametrize("layer", ["embedding", "projection"])
def test_serialized_splits_rules(prefix, layer):
    name = f"{prefix}serialized_{layer}_splits_per_ipu"
    base = {"layers_per_ipu": [0, 4, 4, 4]}
    with pytest.raises(IPUConfigError, match=rf"{name}=\[1, -1, 0, 0\]: entries must be >= 0"):
        IPUConfig(**base, **{name: [1, -1, 0, 0]})
    with pytest.raises(IPUConfigError, match=rf"{name}=\[0, 0, 0, 0\] must place at least 1 split"):
        IPUConfig(**base, **{name: [0, 0, 0, 0]})
    with pytest.raises(IPUConfigError, match=rf"{name}=\[3, 0, 2, 0\]: the IPUs holding splits must be consecutive"):
        IPUConfig(**base, **{name: [3, 0, 2, 0]})
    with pytest.raises(IPUConfigError, match=rf"{name}=\[1, 1\] has 2 entries but {prefix}ipus_per_replica=4"):
        IPUConfig(**base, **{name: [1, 1]})
    factor = f"{prefix}{layer}_serialization_factor"
    with pytest.raises(IPUConfigError, match=rf"set only one of {factor}=4 and {name}=\[0, 2, 2, 0\].*set {factor}=1"):
        IPUConfig(**base, **{name: [0, 2, 2, 0], factor: 4})
    assert IPUConfig(**base, **{name: [0, 2, 2, 0]}).to_dict()[name] == [0, 2, 2, 0]


@pytest.mark.parametrize("name, value, expected", [
    ("replication_factor", True, "an integer"),
    ("replication_factor", 2.0, "an integer"),
    ("layers_per_ipu", 4, "a list of integers"),
    ("layers_per_ipu", [], "a list of integers"),
    ("optimizer_state_offchip", "yes", "a boolean"),
    ("matmul_proportion", [0.2, "x"], "a float or a list of floats"),
    ("executable_cache_dir", 3, "a string"),
    ("parallelize_kwargs", [1], "a JSON object"),
    ("seed", 1.5, "an integer or null"),
])
def test_values_have_their_declared_types(name, value, expected):
    with pytest.raises(IPUConfigError, match=f"^{name} must be {expected}"):
        IPUConfig(**{name: value})


# --- layer -> stage map --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers_per_ipu, ipus, num_layers, expected", [
    ([-1], None, 5, [5]),  # P = 1: everything on IPU 0
    ([-1], 4, 10, [2, 2, 2, 4]),  # even split, remainder to the last IPU
    ([-1, -1, -1], None, 7, [2, 2, 3]),
    ([0, 4, 4, 4], None, 12, [0, 4, 4, 4]),  # an IPU may hold no layer
    ([1, -1, 2, -1], None, 10, [1, 3, 2, 4]),  # wildcards share the rest, remainder to the last wildcard
    ([-1, 3, -1, 3], None, 13, [3, 3, 4, 3]),
    ([0, -1, -1, 6], None, 7, [0, 0, 1, 6]),  # a wildcard may get nothing
    ([2, 3], None, 5, [2, 3]),
])
def test_layer_map(layers_per_ipu, ipus, num_layers, expected):
    config = IPUConfig(layers_per_ipu=layers_per_ipu, ipus_per_replica=ipus)
    assert config.layers_per_stage(num_layers) == expected
    assert config.layer_stages(num_layers) == [stage for stage, n in enumerate(expected) for _ in range(n)]


def test_layer_map_with_one_ipu_ignores_the_counts():
    config = IPUConfig(layers_per_ipu=[3, -1], ipus_per_replica=1)
    assert config.layer_stages(5) == [0] * 5


@pytest.mark.parametrize("name", ["layers_per_ipu", "inference_layers_per_ipu"])
@pytest.mark.parametrize("count", [1, 7])
def test_one_entry_that_is_not_the_model_depth_is_refused(name, count):
    config = IPUConfig(**{name: [count]})
    mode = config.eval if name.startswith("inference_") else config.train
    with pytest.raises(IPUConfigError, match=rf"^{name}=\[{count}\] places {count} layers on its one IPU but the "
                                             rf"model has 12: use \[-1\] \(every layer\) or \[12\]$"):
        mode().layer_stages(12)


@pytest.mark.parametrize("name", ["layers_per_ipu", "inference_layers_per_ipu"])
@pytest.mark.parametrize("layers, num_layers", [([12], 12), ([-1], 12), ([-1], 5), ([-1], 48)])
def test_one_entry_that_fits_puts_every_layer_on_ipu_0(name, layers, num_layers):
    config = IPUConfig(**{name: layers})
    assert config.train().layer_stages(num_layers) == [0] * num_layers
    assert config.eval().layers_per_stage(num_layers) == [num_layers]


@pytest.mark.parametrize("name", ["layers_per_ipu", "inference_layers_per_ipu"])
def test_two_entries_are_checked_against_the_model_depth(name):
    config = IPUConfig(**{name: [2, 2]})
    mode = config.eval if name.startswith("inference_") else config.train
    with pytest.raises(IPUConfigError, match=rf"^{name}=\[2, 2\] does not define the correct number of layers: it "
                                             rf"places 4 layers but the model has 12"):
        mode().layer_stages(12)
    config.update(**{name: [6, 6]})
    assert mode().layers_per_stage(12) == [6, 6]


def test_an_inference_layout_left_unset_names_the_training_key():
    # The scripts check the inference layout first; it follows layers_per_ipu, which is what the user wrote.
    with pytest.raises(IPUConfigError, match=r"^layers_per_ipu=\[7\] places 7 layers"):
        IPUConfig(layers_per_ipu=[7]).eval().layer_stages(12)
    with pytest.raises(IPUConfigError, match=r"^layers_per_ipu=\[0, 4, 4, 4\] does not define"):
        IPUConfig(layers_per_ipu=[0, 4, 4, 4]).eval().layer_stages(6)


def test_layer_map_in_inference_mode_uses_the_inference_layout():
    config = IPUConfig(layers_per_ipu=[0, -1, -1, 4], inference_layers_per_ipu=[-1, 2])
    assert config.layer_stages(10) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert config.eval().layer_stages(10) == [0] * 8 + [1, 1]
    assert config.train().layers_per_stage(10) == [0, 3, 3, 4]


def test_layer_map_errors_name_the_key_and_the_model_layer_count():
    with pytest.raises(IPUConfigError, match=r"^layers_per_ipu=\[0, 4, 4, 4\] does not define the correct number of "
                                             r"layers: it places 12 layers but the model has 6; make the entries sum "
                                             r"to 6, or use -1 wildcards$"):
        IPUConfig(layers_per_ipu=[0, 4, 4, 4]).layer_stages(6)
    with pytest.raises(IPUConfigError, match=r"^inference_layers_per_ipu=\[3, 3\] does not define the correct number "
                                             r"of layers: it places 6 layers but the model has 12"):
        IPUConfig(inference_layers_per_ipu=[3, 3]).eval().layer_stages(12)
    with pytest.raises(IPUConfigError, match=r"layers_per_ipu=\[8, -1\] does not define the correct number of layers: "
                                             r"its fixed entries place 8 layers but the model has 6"):
        IPUConfig(layers_per_ipu=[8, -1]).layer_stages(6)
    with pytest.raises(IPUConfigError, match=r"^layers_per_ipu=\[1, -1\] has 2 entries but ipus_per_replica=4: give "
                                             r"one entry per IPU, or \[-1\] to split the layers evenly$"):
        IPUConfig(layers_per_ipu=[1, -1], ipus_per_replica=4).layer_stages(8)
    with pytest.raises(IPUConfigError, match=r"inference_layers_per_ipu=\[-1, -1\] has 2 entries but "
                                             r"inference_ipus_per_replica=3"):
        IPUConfig(inference_layers_per_ipu=[-1, -1], inference_ipus_per_replica=3).eval().layer_stages(8)


# --- batch factors, n_ipu, IPU-only fields --------------------------------------------------------------------


def test_batch_size_factor():
    config = IPUConfig(replication_factor=2, gradient_accumulation_steps=8, device_iterations=3,
                       inference_replication_factor=4, inference_device_iterations=5)
    assert config.batch_size_factor() == 2 * 8 * 3
    assert config.batch_size_factor(for_inference=True) == 4 * 5
    assert config.eval().batch_size_factor() == 2 * 8 * 3  # the argument decides, not the mode


def test_n_ipu_sets_replication_for_both_layouts():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], inference_layers_per_ipu=[6, 6])
    assert config.apply_n_ipu(16) is config
    assert (config.replication_factor, config.inference_replication_factor) == (4, 8)


def test_n_ipu_must_be_a_multiple_of_the_replica_width():
    with pytest.raises(IPUConfigError, match=r"^--n_ipu 6 is not a multiple of ipus_per_replica=4: use a multiple of "
                                             r"4 \(one replica needs 4 IPUs\)$"):
        IPUConfig(layers_per_ipu=[0, 4, 4, 4]).apply_n_ipu(6)
    with pytest.raises(IPUConfigError, match="--n_ipu 4 is not a multiple of inference_ipus_per_replica=3"):
        IPUConfig(layers_per_ipu=[1, 1], inference_layers_per_ipu=[1, 1, 1]).apply_n_ipu(4)
    with pytest.raises(IPUConfigError, match="--n_ipu must be a positive integer"):
        IPUConfig().apply_n_ipu(0)


def test_unused_on_pytorch_lists_ipu_only_fields_set_away_from_their_default():
    assert IPUConfig().unused_on_pytorch() == []
    config = IPUConfig(matmul_proportion=0.3, output_mode="all", explicit_ir_inference=True, seed=3,
                       gradient_accumulation_steps=4)
    assert config.unused_on_pytorch() == ["matmul_proportion", "output_mode", "explicit_ir_inference"]


# --- shipped configurations ------------------------------------------------------------------------------------

# name: (layers of the model family, layers_per_ipu, matmul_proportion, embedding serialization, device iterations,
#        inference device iterations, gradient accumulation, recompute, offchip, RTS)
SHIPPED = {
    "bert-base": (12, [0, 4, 4, 4], 0.25, 1, 1, 5, 16, True, False, True),
    "bert-large": (24, [3, 7, 7, 7], [0.1, 0.15, 0.15, 0.15], 2, 1, 4, 512, True, True, True),
    "roberta-base": (12, [0, 4, 4, 4], 0.25, 1, 1, 5, 16, True, True, True),
    "roberta-large": (24, [3, 7, 7, 7], [0.1, 0.2, 0.25, 0.25], 2, 1, 4, 16, True, True, True),
    "gpt2": (12, [0, 4, 4, 4], 0.25, 4, 2, 5, 128, True, True, True),
    "gpt2-medium": (24, [0, 3, 3, 3, 3, 4, 4, 4], 0.25, 5, 2, 9, 256, True, True, True),
    "distilbert-base": (6, [2, 4], 0.25, 1, 1, 5, 16, True, False, True),
    "xlnet-base": (12, [0, 4, 4, 4], 0.2, 4, 1, 5, 16, True, True, True),
    "albert-base": (12, [-1], 0.25, 1, 1, 5, 16, True, False, True),
}


def test_every_shipped_configuration_is_listed():
    assert sorted(os.listdir(CONFIGS)) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configuration_values_and_layer_maps(name):
    (num_layers, layers, matmul, embedding, iterations, inference_iterations, accumulation,
     recompute, offchip, rts) = SHIPPED[name]
    source = IPUConfig.from_pretrained(os.path.join(CONFIGS, name))
    assert IPUConfig.from_pretrained(os.path.join(CONFIGS, name, "ipu_config.json")) == source
    config = source.for_pod_type()
    assert config.layers_per_ipu == layers
    assert config.matmul_proportion == matmul
    assert config.embedding_serialization_factor == embedding
    assert (config.device_iterations, config.inference_device_iterations) == (iterations, inference_iterations)
    assert config.gradient_accumulation_steps == accumulation
    assert (config.recompute_checkpoint_every_layer, config.optimizer_state_offchip,
            config.replicated_tensor_sharding) == (recompute, offchip, rts)
    for mode in (config.train, config.eval):
        stages = mode().layer_stages(num_layers)
        assert len(stages) == num_layers and stages == sorted(stages)
        assert max(stages) < config.ipus_per_replica
    # Replication follows the pod size: a pod's IPUs divided by the IPUs of one replica.
    for pod in source.replication_factor:
        if pod != "default":
            resolved = source.for_pod_type(pod)
            assert resolved.replication_factor * resolved.ipus_per_replica == int(pod[3:])
            assert resolved.inference_replication_factor * resolved.inference_ipus_per_replica == int(pod[3:])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [0.2, float("nan")]])
def test_matmul_proportion_must_be_a_finite_fraction(value):
    with pytest.raises(IPUConfigError, match="matmul_proportion"):
        IPUConfig(layers_per_ipu=[-1, -1], matmul_proportion=value)
