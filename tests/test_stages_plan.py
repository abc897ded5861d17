"""Stage plan (layers, parameters, tied and shared weights), batch arithmetic, and the plan printer CLI."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    BertConfig,
    BertForPreTraining,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    RobertaConfig,
    RobertaForMaskedLM,
    XLNetConfig,
    XLNetLMHeadModel,
)

from ipu_train import IPUConfig
from ipu_train.errors import UserError
from ipu_train.pipeline.stages import build_stage_plan, describe_batch, transformer_layers
from ipu_train.plan import load_model_config, main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=64, max_position_embeddings=32)


def _meta(model_class, config):
    with torch.device("meta"):
        return model_class(config)


def tiny_gpt2(n_layer=4):
    return _meta(GPT2LMHeadModel, GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=64, n_positions=32))


def tiny_albert(layers=6, groups=1):
    config = AlbertConfig(num_hidden_layers=layers, num_hidden_groups=groups, embedding_size=8, **TINY)
    return _meta(AlbertForMaskedLM, config)


# --- transformer_layers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, path", [
    (lambda: tiny_gpt2(3), "transformer.h"),
    (lambda: _meta(GPT2Model, GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64)), "h"),
    (lambda: _meta(BertForPreTraining, BertConfig(num_hidden_layers=3, **TINY)), "bert.encoder.layer"),
    (lambda: _meta(RobertaForMaskedLM, RobertaConfig(num_hidden_layers=3, **TINY)), "roberta.encoder.layer"),
    (lambda: _meta(DistilBertForMaskedLM, DistilBertConfig(n_layers=3, dim=16, n_heads=2, hidden_dim=32,
                                                            vocab_size=64)), "distilbert.transformer.layer"),
    (lambda: _meta(XLNetLMHeadModel, XLNetConfig(n_layer=3, d_model=16, n_head=2, d_inner=32, vocab_size=64)),
     "transformer.layer"),
])
def test_transformer_layers_finds_the_repeated_blocks(build, path):
    model = build()
    layers = transformer_layers(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 3
    assert layers is model.get_submodule(path)


def test_albert_layers_repeat_the_shared_group_once_per_hidden_layer():
    model = tiny_albert(layers=6, groups=1)
    layers = transformer_layers(model)
    group = model.albert.encoder.albert_layer_groups[0]
    assert len(layers) == 6 and all(layer is group for layer in layers)
    two_groups = tiny_albert(layers=6, groups=2)
    groups = two_groups.albert.encoder.albert_layer_groups
    assert [list(groups).index(layer) for layer in transformer_layers(two_groups)] == [0, 0, 0, 1, 1, 1]


def test_generic_fallback_is_the_longest_module_list_and_none_is_a_user_error():
    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(5)])

    model = Custom()
    assert transformer_layers(model) is model.blocks
    with pytest.raises(UserError, match="Linear has no list of repeated layers"):
        transformer_layers(torch.nn.Linear(2, 2))


# --- build_stage_plan -------------------------------------------------------------------------------------------


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def test_gpt2_plan_places_layers_embeddings_tied_head_and_final_norm():
    model = tiny_gpt2(n_layer=6)
    plan = build_stage_plan(model, IPUConfig(layers_per_ipu=[0, -1, -1]))
    layer_size = _numel(model.transformer.h[0])
    embeddings = _numel(model.transformer.wte) + _numel(model.transformer.wpe)
    assert [stage.layers for stage in plan.stages] == [[], [0, 1, 2], [3, 4, 5]]
    assert plan.stages[0].parameters == embeddings  # the tied LM head adds nothing
    assert plan.stages[1].parameters == 3 * layer_size
    assert plan.stages[2].parameters == 3 * layer_size + _numel(model.transformer.ln_f)
    assert plan.total_parameters == _numel(model) == sum(stage.parameters for stage in plan.stages)
    assert plan.stages[0].holds == ["transformer.wte", "transformer.wpe", "lm_head (tied to transformer.wte)"]
    assert plan.stages[2].holds == ["transformer.ln_f"]


def test_bert_heads_stay_on_stage_zero_and_tied_decoder_is_counted_once():
    model = _meta(BertForPreTraining, BertConfig(num_hidden_layers=4, **TINY))
    plan = build_stage_plan(model, IPUConfig(layers_per_ipu=[1, 3]))
    layer_size = _numel(model.bert.encoder.layer[0])
    assert plan.stages[1].parameters == 3 * layer_size
    assert plan.stages[0].parameters == _numel(model) - 3 * layer_size
    assert plan.stages[0].holds == ["bert.embeddings", "bert.pooler", "cls (tied to bert.embeddings)"]
    # The tied decoder weight is not in the total twice.
    all_tensors = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert plan.total_parameters == _numel(model) < all_tensors


def test_albert_shared_weights_are_counted_once_on_their_first_stage():
    model = tiny_albert(layers=6)
    plan = build_stage_plan(model, IPUConfig(layers_per_ipu=[0, 2, 4]))
    group = _numel(model.albert.encoder.albert_layer_groups)
    assert [stage.parameters for stage in plan.stages[1:]] == [group, 0]
    assert plan.stages[2].holds == ["layer weights shared with stage 1"]
    assert plan.total_parameters == _numel(model)
    assert "albert.encoder.embedding_hidden_mapping_in" in plan.stages[0].holds


def test_xlnet_own_parameters_of_the_layer_parent_are_listed():
    model = _meta(XLNetLMHeadModel, XLNetConfig(n_layer=4, d_model=16, n_head=2, d_inner=32, vocab_size=64))
    plan = build_stage_plan(model, IPUConfig(layers_per_ipu=[-1, -1]))
    assert plan.total_parameters == _numel(model)
    assert "transformer.mask_emb" in plan.stages[0].holds  # a parameter of XLNetModel itself
    assert "lm_loss (tied to transformer.word_embedding)" in plan.stages[0].holds


def test_plan_follows_the_mode():
    model = tiny_gpt2(n_layer=4)
    config = IPUConfig(layers_per_ipu=[0, 2, 2], inference_layers_per_ipu=[-1])
    assert len(build_stage_plan(model, config).stages) == 3
    inference = build_stage_plan(model, config.eval())
    assert len(inference.stages) == 1 and inference.stages[0].layers == [0, 1, 2, 3]
    assert inference.stages[0].parameters == _numel(model)


def test_plan_errors_name_the_layer_count():
    with pytest.raises(UserError, match="places 12 layers but the model has 4"):
        build_stage_plan(tiny_gpt2(4), IPUConfig(layers_per_ipu=[0, 4, 4, 4]))


def test_describe_is_a_table_with_ranges_and_shares():
    model = tiny_gpt2(n_layer=6)
    plan = build_stage_plan(model, IPUConfig(layers_per_ipu=[0, 4, 2]))
    lines = plan.describe().splitlines()
    assert lines[0].split() == ["stage", "layers", "parameters", "share", "also", "holds"]
    row = lines[2].split()
    assert row[:3] == ["1", "0-3", f"{plan.stages[1].parameters:,}"]
    assert row[3] == f"{plan.stages[1].parameters / plan.total_parameters:.1%}"
    assert lines[1].split()[1] == "-"
    assert lines[-1].split()[:4] == ["total", "6", "layers", f"{plan.total_parameters:,}"]


# --- describe_batch ---------------------------------------------------------------------------------------------


def test_describe_batch_arithmetic():
    config = IPUConfig(gradient_accumulation_steps=3, replication_factor=4, device_iterations=5,
                       inference_replication_factor=2, inference_device_iterations=7)
    text = describe_batch(config, micro_batch=2, inference_micro_batch=6)
    assert "micro-batch 2 x gradient accumulation 3 x replicas 4 = 24 samples per optimizer step" in text
    assert "x device iterations 5 = 120 samples per host call" in text
    assert "batch_size_factor 60" in text
    assert "micro-batch 6 x replicas 2 = 12 samples per step" in text
    assert "x device iterations 7 = 84 samples per host call" in text
    assert "micro-batch 2 x replicas 2 = 4" in describe_batch(config, micro_batch=2)


# --- the plan printer CLI ---------------------------------------------------------------------------------------

# Each shipped configuration with its model family, full depth, narrow width (the plan needs shapes only).
FAMILIES = {
    "bert-base": ("bert", "num_hidden_layers=12,hidden_size=32,num_attention_heads=2,intermediate_size=64"),
    "bert-large": ("bert", "num_hidden_layers=24,hidden_size=32,num_attention_heads=2,intermediate_size=64"),
    "roberta-base": ("roberta", "num_hidden_layers=12,hidden_size=32,num_attention_heads=2,intermediate_size=64"),
    "roberta-large": ("roberta", "num_hidden_layers=24,hidden_size=32,num_attention_heads=2,intermediate_size=64"),
    "gpt2": ("gpt2", "n_layer=12,n_embd=32,n_head=2"),
    "gpt2-medium": ("gpt2", "n_layer=24,n_embd=32,n_head=2"),
    "distilbert-base": ("distilbert", "n_layers=6,dim=32,n_heads=2,hidden_dim=64"),
    "xlnet-base": ("xlnet", "n_layer=12,d_model=32,n_head=2,d_inner=64"),
    "albert-base": ("albert", "num_hidden_layers=12,hidden_size=32,num_attention_heads=2,intermediate_size=64"),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_shipped_configuration_prints_a_plan(name, capsys):
    model_type, overrides = FAMILIES[name]
    code = main(["--ipu_config", f"{ROOT}/ipu_configs/{name}", "--model_type", model_type,
                 "--config_overrides", overrides, "--pod_type", "pod16"])
    out = capsys.readouterr().out
    assert code == 0, out
    config = IPUConfig.from_pretrained(f"{ROOT}/ipu_configs/{name}").for_pod_type("pod16")
    assert f"training: layers_per_ipu={config.layers_per_ipu}" in out
    assert f"training {config.ipus_per_replica} per replica x {16 // config.ipus_per_replica} replicas = 16" in out
    stage_rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(stage_rows) == config.ipus_per_replica
    assert "weights not loaded" in out


def _first_line(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()[0]


def _layers_and_parameters(first_line):
    layers, parameters = re.search(r"\((\d+) layers, ([\d,]+) parameters", first_line).groups()
    return int(layers), int(parameters.replace(",", ""))


def test_every_shipped_configuration_has_the_size_it_was_written_for():
    assert sorted(os.listdir(f"{ROOT}/ipu_configs")) == sorted(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bare_model_type_plans_the_size_the_shipped_configuration_was_written_for(name, capsys):
    # No --config_overrides: the assumed size must fit the configuration's own layers_per_ipu.
    line = _first_line(["--ipu_config", f"{ROOT}/ipu_configs/{name}", "--model_type", FAMILIES[name][0],
                        "--pod_type", "pod16"], capsys)
    assert ", from the configuration's name: " in line and "library's default" not in line


@pytest.mark.parametrize("name, model_type, size, layers", [
    ("xlnet-base", "xlnet", "XLNet base (xlnet-base-cased)", 12),  # the library's default is XLNet-large, 24
    ("bert-large", "bert", "BERT large (bert-large-uncased)", 24),  # the library's default is BERT base, 12
    ("gpt2-medium", "gpt2", "GPT-2 medium (gpt2-medium)", 24),
])
def test_first_line_names_the_assumed_size_and_its_layers(name, model_type, size, layers, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = _first_line(["--ipu_config", f"ipu_configs/{name}", "--model_type", model_type], capsys)
    assert line.startswith(f"IPU plan: ipu_configs/{name} for {size}, from the configuration's name: ")
    assert _layers_and_parameters(line)[0] == layers


def test_albert_base_is_about_12m_parameters_not_xxlarge(capsys):
    line = _first_line(["--ipu_config", f"{ROOT}/ipu_configs/albert-base", "--model_type", "albert"], capsys)
    assert "ALBERT base (albert-base-v2)" in line
    assert 11_000_000 < _layers_and_parameters(line)[1] < 12_500_000  # ALBERT-xxlarge has 223 M


def test_shipped_sizes_are_the_published_checkpoints():
    def config(name, model_type):
        return load_model_config(parse_args(["--ipu_config", f"ipu_configs/{name}", "--model_type", model_type]))[0]

    xlnet = config("xlnet-base", "xlnet")
    assert (xlnet.n_layer, xlnet.d_model, xlnet.n_head, xlnet.d_inner, xlnet.vocab_size) == (12, 768, 12, 3072, 32000)
    assert xlnet.d_head == 64  # derived by the config itself, not left at XLNet-large's
    albert = config("albert-base", "albert")
    assert (albert.num_hidden_layers, albert.hidden_size, albert.num_attention_heads, albert.intermediate_size,
            albert.embedding_size, albert.vocab_size) == (12, 768, 12, 3072, 128, 30000)
    roberta = config("roberta-base", "roberta")
    assert (roberta.vocab_size, roberta.max_position_embeddings, roberta.type_vocab_size) == (50265, 514, 1)


def test_config_overrides_win_over_the_assumed_size(capsys):
    args = ["--ipu_config", f"{ROOT}/ipu_configs/xlnet-base/ipu_config.json", "--model_type", "xlnet",
            "--config_overrides", "n_layer=8,d_inner=1024"]
    line = _first_line([*args, "--ipu_config_overrides", "layers_per_ipu=[0 2 3 3]"], capsys)
    assert "for XLNet base (xlnet-base-cased), from the configuration's name, with --config_overrides: " in line
    assert _layers_and_parameters(line)[0] == 8
    config = load_model_config(parse_args(args))[0]
    assert (config.n_layer, config.d_inner, config.d_model) == (8, 1024, 768)


@pytest.mark.parametrize("model_type, copy_of, directory, layers", [
    ("xlnet", "xlnet-base", "my-config", 24),  # not a shipped configuration's name
    ("bert", "gpt2", "gpt2", 12),  # a shipped name, but written for another model type
])
def test_other_configurations_say_which_default_size_they_assumed(model_type, copy_of, directory, layers, tmp_path,
                                                                  capsys):
    shutil.copytree(f"{ROOT}/ipu_configs/{copy_of}", tmp_path / directory)
    line = _first_line(["--ipu_config", str(tmp_path / directory), "--model_type", model_type,
                        "--ipu_config_overrides", f"layers_per_ipu=[0 {layers // 3} {layers // 3} {layers // 3}]"],
                       capsys)
    assert f"for the library's default {model_type} config: " in line
    assert _layers_and_parameters(line)[0] == layers


def test_plan_flags_json_path_alias_n_ipu_overrides_and_batch_sizes(capsys):
    code = main(["--ipu_config_name", f"{ROOT}/ipu_configs/gpt2/ipu_config.json", "--model_type", "gpt2",
                 "--config_overrides", "n_layer=6,n_embd=32,n_head=2", "--n_ipu", "8",
                 "--ipu_config_overrides", "layers_per_ipu=[0 3 3 0],inference_layers_per_ipu=[-1 -1],"
                                           "gradient_accumulation_steps=4",
                 "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "training: layers_per_ipu=[0, 3, 3, 0], ipus_per_replica=4" in out
    assert "inference: inference_layers_per_ipu=[-1, -1], inference_ipus_per_replica=2" in out
    assert "micro-batch 2 x gradient accumulation 4 x replicas 2 = 16 samples per optimizer step" in out
    # --n_ipu comes before the overrides (the documented order), so it divided by the 4-IPU inference layout.
    assert "micro-batch 3 x replicas 2 = 6 samples per step" in out
    assert "IPU only (no effect on PyTorch): matmul_proportion" in out


def test_plan_reads_only_the_config_of_a_model_directory(tmp_path, capsys):
    GPT2Config(n_layer=4, n_embd=32, n_head=2).save_pretrained(tmp_path)
    assert main(["--ipu_config", f"{ROOT}/ipu_configs/distilbert-base", "--model_name_or_path", str(tmp_path),
                 "--ipu_config_overrides", "layers_per_ipu=[1 3]"]) == 0
    assert "for GPT2LMHeadModel (4 layers" in capsys.readouterr().out  # a given config assumes no size


@pytest.mark.parametrize("argv, message", [
    (["--ipu_config", "ipu_configs/gpt2", "--model_type", "gpt2", "--config_overrides", "n_layer=6"],
     "layers_per_ipu=[0, 4, 4, 4] does not define the correct number of layers"),
    (["--ipu_config", "ipu_configs/gpt2", "--model_type", "gpt2", "--ipu_config_overrides", "layers_per_ipu=[7]"],
     "layers_per_ipu=[7] places 7 layers on its one IPU but the model has 12: use [-1] (every layer) or [12]"),
    (["--ipu_config", "ipu_configs/gpt2", "--model_type", "gpt2", "--ipu_config_overrides", "replication_factr=2"],
     "did you mean 'replication_factor'"),
    (["--ipu_config", "ipu_configs/gpt2", "--model_type", "gpt2", "--pod_type", "pod5"],
     "--pod_type pod5 is not a pod type"),
    (["--ipu_config", "ipu_configs/gpt2", "--model_type", "gpt2", "--n_ipu", "6"],
     "--n_ipu 6 is not a multiple of ipus_per_replica=4"),
    (["--ipu_config", "ipu_configs/gpt3", "--model_type", "gpt2"], "the Hugging Face Hub is offline"),
    (["--ipu_config", "ipu_configs/gpt2", "--model_type", "gpt9"], "--model_type gpt9: no model configuration"),
    (["--ipu_config", "ipu_configs/gpt2", "--model_type", "gpt2", "--config_overrides", "n_layers=6"],
     "--config_overrides:"),
])
def test_plan_user_errors_are_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_plan_module_runs_as_a_command_without_traceback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "ipu_train.plan", "--ipu_config", "ipu_configs/gpt2", "--model_type",
                          "gpt2", "--ipu_config_overrides", "matmul_proportion=[0.2 0.2]"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: matmul_proportion=[0.2, 0.2] has 2 entries")


@pytest.mark.parametrize("extra, message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size: '0': use a whole number of 1 or more"),
    (["--n_ipu", "8", "--pod_type", "pod16"], "--pod_type: not allowed with argument --n_ipu"),
])
def test_plan_flag_mistakes_are_one_line_and_exit_2(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--ipu_config", "ipu_configs/gpt2", "--model_type", "gpt2", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
