"""--pipeline_stages_across_processes from the scripts: run_clm.py with a tiny GPT-2 of 4 layers in 2 stages under
`torchrun --nproc_per_node 2` logs the losses of the same run in one process (dropout off), saves one from_pretrained
folder equal to the one process's model, resumes a checkpoint exactly on its own layout and refuses it on another;
launches that do not fit, and what is not supported yet, are refused in one line; the plan printer shows the grid."""
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import run_clm
from ipu_train.arguments import IPUTrainingArguments
from ipu_train.backends.pipelined import free_weights
from ipu_train.config import IPUConfig
from ipu_train.errors import UserError
from ipu_train.parallel import ParallelLayout
from ipu_train.plan import main as plan_main

from .conftest import REPO
from .test_scripts_clm_mlm import logged_losses, run_and_expect_user_error

TINY_GPT2_NO_DROPOUT = "n_layer=4,n_embd=32,n_head=2,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"
TWO_STAGES = "layers_per_ipu=[2 2]"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def training_args(text_files, tokenizer_dir, output_dir, *extra):
    """6 optimizer steps of 4 micro-batches of 2 blocks, a checkpoint every 3, a loss logged every step; an
    evaluation every 3 steps and at the end, in batches of 3 blocks (the last one shorter)."""
    return ["--model_type", "gpt2", "--config_overrides", TINY_GPT2_NO_DROPOUT, "--tokenizer_name", str(tokenizer_dir),
            "--train_file", str(text_files / "train.txt"), "--validation_file", str(text_files / "validation.txt"),
            "--do_eval", "--eval_strategy", "steps", "--eval_steps", "3", "--per_device_eval_batch_size", "3",
            "--block_size", "32", "--do_train", "--max_steps", "6",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4", "--learning_rate", "3e-3",
            "--max_grad_norm", "0.5", "--logging_steps", "1", "--save_steps", "3", "--seed", "0",
            "--report_to", "none", "--disable_tqdm", "true", "--device", "cpu", "--ipu_config_overrides", TWO_STAGES,
            "--output_dir", str(output_dir), *extra]


def run(argv, processes=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 \
        else []
    return subprocess.run([sys.executable, *launcher, str(REPO / "run_clm.py"), *argv], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=300)


def evaluations(output_dir):
    """The evaluations logged during training, and the final one's results."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    during = [entry for entry in state["log_history"] if "eval_loss" in entry]
    return during, json.loads((output_dir / "eval_results.json").read_text())


def grad_norms(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["grad_norm"] for entry in state["log_history"] if "grad_norm" in entry]


@pytest.fixture(scope="module")
def runs(text_files, bpe_tokenizer_dir, tmp_path_factory):
    """The same training in one process and as 2 stages on 2 processes (1F1B)."""
    root = tmp_path_factory.mktemp("stages")
    one, two = root / "one", root / "two"
    done = run(training_args(text_files, bpe_tokenizer_dir, one))
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(training_args(text_files, bpe_tokenizer_dir, two, "--pipeline_stages_across_processes",
                             "--log_level_replica", "info"), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return types.SimpleNamespace(one=one, two=two, root=root, two_log=done.stdout + done.stderr)


def test_each_process_keeps_only_its_stage_and_frees_the_whole_model(runs):
    kept = dict(re.findall(r"Rank (\d) keeps stage\(s\) \[\d\] on \S+: (\d+) of the model's \d+ parameters",
                           runs.two_log))
    whole = AutoModelForCausalLM.from_pretrained(runs.one).num_parameters()
    assert sorted(kept) == ["0", "1"] and all(int(count) < whole for count in kept.values()), kept


def test_freeing_the_whole_model_leaves_no_weight_and_keeps_the_ties():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=40, n_positions=16))
    free_weights(model)
    assert all(param.is_meta for param in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_two_stages_on_two_processes_log_the_losses_of_one_process(runs):
    one, two = logged_losses(runs.one), logged_losses(runs.two)
    assert len(one) == len(two) == 6 and one[-1] < one[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    assert worst < 1e-6, f"relative loss difference {worst:.1e}: {one} vs {two}"
    # Clipped by the norm of the whole model's gradient (tied weight once), not each stage's.
    assert grad_norms(runs.two) == pytest.approx(grad_norms(runs.one), rel=1e-5)


def test_compiled_stages_train_and_evaluate_as_the_eager_ones(runs, text_files, bpe_tokenizer_dir):
    """Each stage and the last stage's loss through torch.compile (aot_eager: dynamo and autograd tracing as on
    CUDA, without inductor's minute of code generation on the CPU)."""
    compiled = runs.root / "compiled"
    done = run(training_args(text_files, bpe_tokenizer_dir, compiled, "--pipeline_stages_across_processes",
                             "--torch_compile", "--torch_compile_backend", "aot_eager"), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.compile: the model's forward, loss and backward (backend aot_eager" in done.stdout
    eager, got = logged_losses(runs.two), logged_losses(compiled)
    assert got == pytest.approx(eager, rel=1e-6)
    assert evaluations(compiled)[1]["eval_loss"] == pytest.approx(evaluations(runs.two)[1]["eval_loss"], rel=1e-6)


def test_two_stages_evaluate_as_one_process_with_the_last_batch_padded(runs):
    (during_one, final_one), (during_two, final_two) = evaluations(runs.one), evaluations(runs.two)
    assert [entry["step"] for entry in during_two] == [entry["step"] for entry in during_one] == [3, 6]
    for one, two in zip(during_one + [final_one], during_two + [final_two]):
        assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
        assert two["eval_accuracy"] == pytest.approx(one["eval_accuracy"], rel=1e-5)
    assert final_two["perplexity"] == pytest.approx(final_one["perplexity"], rel=1e-5)
    assert final_two["eval_samples"] == final_one["eval_samples"] and final_one["eval_samples"] % 3  # a short batch


def evaluation_args(model_dir, text_files, tokenizer_dir, output_dir, *extra):
    """An evaluation alone of a trained model, in batches of 3 blocks, 4 of them per pass through the stages."""
    return ["--model_name_or_path", str(model_dir), "--tokenizer_name", str(tokenizer_dir), "--validation_file",
            str(text_files / "validation.txt"), "--do_eval", "--per_device_eval_batch_size", "3", "--block_size", "32",
            "--gradient_accumulation_steps", "4", "--report_to", "none", "--disable_tqdm", "true", "--device", "cpu",
            "--ipu_config_overrides", f"{TWO_STAGES},replicated_tensor_sharding=false", "--output_dir",
            str(output_dir), *extra]


def test_two_stages_by_two_replicas_evaluate_a_trained_model_as_one_process(runs, text_files, bpe_tokenizer_dir):
    one, four = runs.root / "eval-one", runs.root / "eval-four"
    done = run(evaluation_args(runs.one, text_files, bpe_tokenizer_dir, one))
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(evaluation_args(runs.one, text_files, bpe_tokenizer_dir, four, "--pipeline_stages_across_processes"),
               processes=4)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Each process will read only its stage's weights from" in done.stdout  # the model is not loaded whole
    expected, got = (json.loads((folder / "eval_results.json").read_text()) for folder in (one, four))
    assert got["eval_samples"] == expected["eval_samples"]
    for key in ("eval_loss", "eval_accuracy", "perplexity"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key


def test_the_stages_save_one_from_pretrained_folder_equal_to_the_one_process_model(runs):
    one = AutoModelForCausalLM.from_pretrained(runs.one)
    two = AutoModelForCausalLM.from_pretrained(runs.two)
    assert set(two.state_dict()) == set(one.state_dict())
    for name, tensor in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert two.lm_head.weight.data_ptr() == two.transformer.wte.weight.data_ptr()  # still tied
    checkpoint = set(os.listdir(runs.two / "checkpoint-3"))
    assert {"model.safetensors", "optimizer.pipeline-0-of-2.pt", "optimizer.pipeline-1-of-2.pt",
            "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"} <= checkpoint


def fine_tuning_args(runs, text_files, tokenizer_dir, output_dir, *extra):
    """training_args, from the trained one-process model's folder instead of a new model."""
    args = training_args(text_files, tokenizer_dir, output_dir, *extra)
    start = args.index("--model_type")
    return args[:start] + ["--model_name_or_path", str(runs.one)] + args[start + 4:]  # for type and overrides


def test_stages_fine_tune_a_pretrained_model_read_stage_by_stage_as_one_process(runs, text_files, bpe_tokenizer_dir):
    """From --model_name_or_path each process reads only its stage's weights (the model built without any); the
    model saved after training equals the one process's."""
    def fine_tuning(output_dir, *extra):
        return fine_tuning_args(runs, text_files, bpe_tokenizer_dir, output_dir, "--max_steps", "2",
                                "--eval_strategy", "no", "--save_strategy", "no", *extra)

    one, two = runs.root / "tuned-one", runs.root / "tuned-two"
    done = run(fine_tuning(one))
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(fine_tuning(two, "--pipeline_stages_across_processes"), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Each process will read only its stage's weights from" in done.stdout
    expected, got = (AutoModelForCausalLM.from_pretrained(folder).state_dict() for folder in (one, two))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(got["transformer.h.0.mlp.c_fc.weight"],
                           AutoModelForCausalLM.from_pretrained(runs.one).state_dict()["transformer.h.0.mlp.c_fc.weight"])


def test_a_staged_fine_tune_resumes_from_its_checkpoint_and_keeps_its_best_model(runs, text_files,
                                                                                  bpe_tokenizer_dir):
    """Resumed, the stages read the checkpoint's weights, not the pretrained ones they started from; with
    --load_best_model_at_end the saved model is the best checkpoint's (here, by a perverse rule, the first one)."""
    def fine_tuning(output_dir, *extra):
        return fine_tuning_args(runs, text_files, bpe_tokenizer_dir, output_dir, "--pipeline_stages_across_processes",
                                "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", *extra)

    whole, resumed = runs.root / "tuned-whole", runs.root / "tuned-resumed"
    done = run(fine_tuning(whole, "--load_best_model_at_end", "--metric_for_best_model", "eval_loss",
                           "--greater_is_better", "true"), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run(fine_tuning(resumed, "--resume_from_checkpoint", str(whole / "checkpoint-2")), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_losses(resumed) == pytest.approx(logged_losses(whole), rel=1e-6)
    best = json.loads((whole / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert os.path.basename(best) == "checkpoint-2"
    saved, expected, last = (AutoModelForCausalLM.from_pretrained(folder).state_dict()
                             for folder in (whole, whole / "checkpoint-2", whole / "checkpoint-4"))
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
    assert not torch.equal(saved["transformer.h.1.mlp.c_fc.weight"], last["transformer.h.1.mlp.c_fc.weight"])


def test_a_checkpoint_resumes_exactly_on_its_layout_and_is_refused_on_another(runs, text_files, bpe_tokenizer_dir,
                                                                               capsys):
    checkpoint = runs.two / "checkpoint-3"
    resumed = runs.root / "resumed"
    argv = training_args(text_files, bpe_tokenizer_dir, resumed, "--pipeline_stages_across_processes",
                         "--resume_from_checkpoint", str(checkpoint))
    done = run(argv, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_losses(resumed) == logged_losses(runs.two)  # steps 1-3 from the checkpoint's state, 4-6 anew

    one_process = training_args(text_files, bpe_tokenizer_dir, runs.root / "other", "--resume_from_checkpoint",
                                str(checkpoint), "--ignore_data_skip")
    run_and_expect_user_error(run_clm.main, one_process, capsys, "2 pipeline stages across 2 processes per replica",
                              "whole replicas in each process", "--model_name_or_path")


@pytest.mark.parametrize("extra, phrases", [
    ([], ["2 stages", "the 1 process(es)", "--nproc_per_node N` with N a multiple of 2: 2, 4, 6"]),
])
def test_a_launch_that_does_not_fit_is_one_line_before_any_data(extra, phrases, text_files, bpe_tokenizer_dir,
                                                                 tmp_path, capsys):
    argv = training_args(text_files, bpe_tokenizer_dir, tmp_path / "out", "--pipeline_stages_across_processes", *extra)
    run_and_expect_user_error(run_clm.main, argv, capsys, *phrases)
    assert not (tmp_path / "out").exists()


def world(tmp_path, processes, rank=0, **flags):
    """Training arguments as process `rank` of a `processes`-process torchrun sees them."""
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", report_to="none",
                                pipeline_stages_across_processes=True, **flags)
    return types.SimpleNamespace(**{**vars(args), "world_size": processes, "process_index": rank,
                                    "should_save": rank == 0})


def test_four_processes_are_two_stages_by_two_replicas_reading_by_replica(tmp_path):
    config = IPUConfig(layers_per_ipu=[2, 2], gradient_accumulation_steps=2)
    layouts = [ParallelLayout.build(config, world(tmp_path, 4, rank)) for rank in range(4)]
    assert config.replication_factor == 2
    assert [(lay.data_rank, lay.data_processes, lay.micro_batches_per_step) for lay in layouts] == \
        [(0, 2, 2), (0, 2, 2), (1, 2, 2), (1, 2, 2)]
    order = list(range(16))
    assert layouts[0].share_of_steps(order, 2) == layouts[1].share_of_steps(order, 2) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert layouts[2].share_of_steps(order, 2) == [4, 5, 6, 7, 12, 13, 14, 15]


@pytest.mark.parametrize("config, processes, flags, phrase", [
    (dict(layers_per_ipu=[2, 2], gradient_accumulation_steps=4), 3, {}, "N a multiple of 2: 2, 4, 6"),
    (dict(layers_per_ipu=[2, 2], replication_factor=2, gradient_accumulation_steps=4), 2, {}, "with N 4"),
    (dict(layers_per_ipu=[4], gradient_accumulation_steps=4), 1, {}, "needs 2 or more pipeline stages"),
    (dict(layers_per_ipu=[2, 2], gradient_accumulation_steps=1), 2, {}, "gradient_accumulation_steps >= 2"),
    (dict(layers_per_ipu=[1, 1, 1, 1], gradient_accumulation_steps=3), 2,
     {"pipeline_schedule": "interleaved_1f1b"}, "a multiple of 2"),
    (dict(layers_per_ipu=[2, 2], replicated_tensor_sharding=True, gradient_accumulation_steps=4), 4, {},
     "replicated_tensor_sharding=false"),
])
def test_layouts_that_do_not_run_are_refused_naming_what_fits(tmp_path, config, processes, flags, phrase):
    with pytest.raises(UserError, match=phrase.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ParallelLayout.build(IPUConfig(**config), world(tmp_path, processes, **flags))


@pytest.mark.parametrize("flags, phrase", [
    (dict(pipeline_schedule="gpipe", pipeline_stages_across_processes=False), "add that flag"),
    (dict(torch_compile=True, torch_compile_mode="reduce-overhead"), "--cuda_graphs"),
    (dict(compile_only=True), "--compile_only"),
])
def test_flags_the_stages_do_not_run_yet_are_refused(tmp_path, flags, phrase):
    flags = {"pipeline_stages_across_processes": True, **flags}
    with pytest.raises(UserError, match=phrase):
        IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", report_to="none", **flags)


def test_without_the_flag_nothing_changes(tmp_path):
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", report_to="none")
    assert args.pipeline_schedule is None and not args.pipeline_stages_across_processes
    layout = ParallelLayout.build(IPUConfig(layers_per_ipu=[2, 2]), args)
    assert not layout.pipelined and (layout.data_processes, layout.data_rank) == (1, 0)


def test_the_plan_prints_the_process_grid_and_the_bubble(capsys):
    code = plan_main(["--ipu_config", str(REPO / "ipu_configs" / "gpt2"), "--model_type", "gpt2",
                      "--pipeline_stages_across_processes", "--ipu_config_overrides",
                      "layers_per_ipu=[3 3 3 3],gradient_accumulation_steps=8,replication_factor=2,"
                      "replicated_tensor_sharding=false"])
    out = capsys.readouterr().out
    assert code == 0
    assert "stages across processes (1f1b): 4 process(es) per replica x 2 replica(s) = torchrun " \
           "--nproc_per_node 8" in out
    assert "  rank 5: stage 1, replica 1" in out and "  rank 0: stage 0, replica 0 (writes output_dir)" in out
    assert "estimated bubble: 27.3% of each step idle" in out  # (4 - 1) / (8 + 4 - 1)

    code = plan_main(["--ipu_config", str(REPO / "ipu_configs" / "gpt2"), "--model_type", "gpt2",
                      "--pipeline_stages_across_processes", "--pipeline_schedule", "interleaved_1f1b",
                      "--ipu_config_overrides", "layers_per_ipu=[3 3 3 3],gradient_accumulation_steps=8,"
                      "replicated_tensor_sharding=false"])
    out = capsys.readouterr().out
    assert code == 0 and "  rank 1: stages 1, 3, replica 0" in out
    assert "estimated bubble: 5.6% of each step idle" in out  # (2 - 1) / (8 + 2 - 1) / 2


def test_stages_pad_every_sequence_to_one_length_and_refuse_packing(text_files):
    """Stages fix the shapes sent between them at their first step: no batch padded to its own longest sequence,
    and no packed rows (their 4-D mask and position ids do not travel between stages)."""
    import run_pretraining

    flags = types.SimpleNamespace(do_train=True, max_steps=-1, compile_only=False, device_type="cpu",
                                  pipeline_stages_across_processes=True)
    data_args = run_pretraining.DataTrainingArguments(train_file=str(text_files / "train.txt"))
    assert not data_args.pad_to_max_length
    data_args.check_with(flags)
    assert data_args.pad_to_max_length
    packed = run_pretraining.DataTrainingArguments(train_file=str(text_files / "train.txt"), pack_sequences=True)
    with pytest.raises(UserError, match="--pack_sequences is not available with --pipeline_stages_across_processes"):
        packed.check_with(flags)
    one_process = run_pretraining.DataTrainingArguments(train_file=str(text_files / "train.txt"))
    one_process.check_with(types.SimpleNamespace(**{**vars(flags), "pipeline_stages_across_processes": False}))
    assert not one_process.pad_to_max_length
