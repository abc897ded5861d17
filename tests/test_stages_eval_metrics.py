"""Evaluation metrics with --pipeline_stages_across_processes: run_pretraining.py (BERT: MLM and NSP loss and
accuracy), run_mlm.py (RoBERTa: accuracy) and run_plm.py (XLNet: loss and perplexity) as 2 stages under `torchrun
--nproc_per_node 2` report every metric of the same run in one process, without --prediction_loss_only. The
evaluation set of 35 samples, in micro-batches of 2, 4 to a step, leaves the last step 3 real rows and 5 of padding
(one row of a micro-batch and two whole ones), which must count nowhere. Evaluating midway through training also
checks that the padding draws no random masks: the following steps' masks, and so their losses, would differ.

In this process: the last stage's logits are the whole model's (names, shapes, values) for every model served, and
the other stages' stand-ins have the same names and shapes with no rows; the evaluation loss counts every masked
token, as the model's own forward does, not the training cap's; the last step is padded after collation."""
import json
import subprocess
import sys

import pytest
import torch

from ipu_train.backends.pipelined import REAL_ROWS, STEP_POSITION, _EvaluationSteps, _uncapped
from ipu_train.config import IPUConfig
from ipu_train.pipeline.heads import IGNORE_INDEX
from ipu_train.pipeline.process_stages import STAGE_CLASSES, build_stage_module, stage_plan_for

from .conftest import REPO
from .test_process_stages import FAMILIES, micro_batch, model_class, tiny_config
from .test_scripts_clm_mlm import logged_losses
from .test_stages_across_processes import ENV
from .test_stages_across_processes_mlm_plm import ENCODER_NO_DROPOUT, XLNET_NO_DROPOUT

EVAL_SAMPLES, EVAL_MICRO_BATCH, MICRO_BATCHES, STEPS = 35, 2, 4, 8
SCRIPTS = {  # script, model type, config overrides, tokenizer fixture, the metrics beyond the loss it reports
    "pretraining": ("run_pretraining.py", "bert", ENCODER_NO_DROPOUT, "wordpiece_tokenizer_dir",
                    ("eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_loss", "eval_nsp_accuracy")),
    "mlm": ("run_mlm.py", "roberta", ENCODER_NO_DROPOUT, "roberta_tokenizer_dir", ("eval_accuracy",)),
    "plm": ("run_plm.py", "xlnet", XLNET_NO_DROPOUT, "unigram_tokenizer_dir", ()),
}
TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def script_args(script, text_files, tokenizer_dir, output_dir):
    """8 optimizer steps of 4 micro-batches of 2 sequences of 32 tokens; an evaluation after the 4th, the 8th and
    at the end (by --do_eval, with other random masks)."""
    _, model_type, overrides, _, _ = SCRIPTS[script]
    return ["--model_type", model_type, "--config_overrides", overrides, "--tokenizer_name", str(tokenizer_dir),
            "--train_file", str(text_files / "train.txt"), "--validation_file", str(text_files / "validation.txt"),
            "--max_seq_length", "32", "--pad_to_max_length", "--do_train", "--max_steps", str(STEPS),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", str(MICRO_BATCHES),
            "--do_eval", "--eval_strategy", "steps", "--eval_steps", str(STEPS // 2),
            "--per_device_eval_batch_size", str(EVAL_MICRO_BATCH), "--max_eval_samples", str(EVAL_SAMPLES),
            "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0",
            "--report_to", "none", "--disable_tqdm", "true", "--device", "cpu",
            "--ipu_config_overrides", "layers_per_ipu=[2 2]", "--output_dir", str(output_dir)]


def one_process_and_two_stages(script, text_files, tokenizer_dir, root):
    """The run in one process, then as 2 stages on 2 processes; their output folders."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    folders = root / "one", root / "two"
    for folder, launcher, flags in zip(folders, ([], torchrun), ([], ["--pipeline_stages_across_processes"])):
        argv = [*launcher, str(REPO / SCRIPTS[script][0]), *script_args(script, text_files, tokenizer_dir, folder)]
        done = subprocess.run([sys.executable, *argv, *flags], capture_output=True, text=True, cwd=REPO, env=ENV,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return folders


def evaluations(output_dir):
    """Every evaluation's metrics, those logged during training and the final one, timings left out."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    during = [entry for entry in state["log_history"] if "eval_loss" in entry]
    final = json.loads((output_dir / "eval_results.json").read_text())
    return [{key: value for key, value in entry.items() if key not in TIMINGS} for entry in during + [final]]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_two_stages_report_every_metric_of_one_process(script, text_files, request, tmp_path):
    one, two = one_process_and_two_stages(script, text_files, request.getfixturevalue(SCRIPTS[script][3]), tmp_path)
    expected, got = evaluations(one), evaluations(two)
    assert len(expected) == len(got) == 3 and expected[-1]["eval_samples"] == EVAL_SAMPLES
    for wanted in ("eval_loss", "perplexity") + SCRIPTS[script][4]:
        assert wanted in expected[-1], wanted
    for one_eval, two_eval in zip(expected, got):
        assert two_eval.keys() == one_eval.keys()
        for key, value in one_eval.items():
            if key.endswith("accuracy"):
                assert two_eval[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            else:
                assert two_eval[key] == pytest.approx(value, rel=1e-5), key
    # The padding draws no masks: the step after an evaluation trains on the one process's masks.
    losses_one, losses_two = logged_losses(one), logged_losses(two)
    assert len(losses_one) == STEPS and losses_two == pytest.approx(losses_one, rel=1e-5)


# --- in this process -----------------------------------------------------------------------------------------------


def whole_model_stage(family, max_predictions=None):
    """A tiny model of `family` and one stage that holds all of it."""
    config = tiny_config(family)
    torch.manual_seed(3)
    model = model_class(family)(config).eval()
    plan = stage_plan_for(config, IPUConfig(layers_per_ipu=[4]), type(model).__name__)
    return model, build_stage_module(model, plan, 0, max_predictions=max_predictions).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_last_stage_returns_the_logits_of_the_whole_model(family):
    """One stage holding the whole model: its head's logits are the model's own forward's, by the same names; the
    stand-in of a stage without the head has the same names and row shapes."""
    model, stage = whole_model_stage(family)
    batch = micro_batch(family, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(**{key: value for key, value in batch.items()
                            if key not in ("labels", "next_sentence_label")})
        got = stage.logits(run_whole(stage, batch))
    shapes = type(stage).logits_row_shapes(batch, model.config.vocab_size)
    assert list(got) == list(shapes)
    for name, logits in got.items():
        assert logits.shape == (len(batch["input_ids"]), *shapes[name])
        torch.testing.assert_close(logits, expected[name], rtol=1e-5, atol=1e-5)


def test_every_stage_class_returns_the_logits_its_metrics_read():
    """Evaluation asks each stage class for its logits (no refusal is left for one without)."""
    assert all(callable(getattr(stage_class, "logits", None)) for stage_class in STAGE_CLASSES)


def run_whole(stage, batch):
    """A stage that holds the whole model, run on a batch: its final outputs."""
    inputs, side = stage.stage_inputs(batch)
    return stage(*inputs, **side)


def test_the_evaluation_loss_counts_every_masked_token():
    """Built with the training cap of 1 masked token a row, the stage evaluates the loss of all of them."""
    model, stage = whole_model_stage("bert-mlm", max_predictions=1)
    batch = micro_batch("bert-mlm", torch.Generator().manual_seed(5))
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) > 1).all()
    with torch.no_grad():
        expected = model(**batch).loss
        finished = run_whole(stage, batch)
        capped = stage.loss(finished, batch["labels"])
        with _uncapped([stage]):
            uncapped = stage.loss(finished, batch["labels"])
    assert stage.max_predictions == 1 and not torch.isclose(capped, expected)
    torch.testing.assert_close(uncapped, expected)


class _Loader(list):
    dataset = range(5)


def test_the_last_step_is_completed_with_ignored_copies_of_its_last_row():
    """5 samples in micro-batches of 2, 2 to a step: as collated (2, 2, 1), then the second step padded to 4 rows
    with its last row, labels ignored; one item per micro-batch."""
    collated = [{"input_ids": torch.arange(rows * 3).view(rows, 3) + 10 * first,
                 "labels": torch.arange(rows * 3).view(rows, 3) + 10 * first}
                for first, rows in ((0, 2), (2, 2), (4, 1))]
    steps = _EvaluationSteps(_Loader(collated), 2, 2, ["labels"])
    items = list(steps)
    assert len(steps) == len(items) == 4
    assert [item[STEP_POSITION] for item in items] == [0, 1, 0, 1]
    assert [item.get(REAL_ROWS) for item in items] == [4, None, 1, None]
    last = items[2]
    assert torch.equal(last["input_ids"], collated[2]["input_ids"].expand(4, 3))
    assert torch.equal(last["labels"][0], collated[2]["labels"][0])
    assert (last["labels"][1:] == IGNORE_INDEX).all()
    assert torch.equal(items[0]["labels"], torch.cat([collated[0]["labels"], collated[1]["labels"]]))
