"""Loss parity with transformers.Trainer on CPU in fp32: same model, data order, hyperparameters and seed.

Loss normalisation: transformers.Trainer 5.x divides the summed token loss of all micro-batches of a step by their
total token count (num_items_in_batch); IPUTrainer takes the mean over micro-batches of each micro-batch's mean
(PopTorch's Mean reduction). The two agree when every micro-batch holds the same number of label tokens, so the data
here has equal-length rows and no padding. transformers 5.24 derives `loss_type` from the class name and finds none
for GPT2LMHeadModel, so its Trainer would count the unshifted labels (S per row, where the causal loss has S-1
targets) and log losses (S-1)/S too small; setting `loss_type` on the instance gives it the count it means to use."""
import copy
import math

from transformers import Trainer, TrainingArguments

from ipu_train.arguments import IPUTrainingArguments
from ipu_train.config import IPUConfig
from ipu_train.trainer import IPUTrainer

from ._trainer_fixtures import collate, losses, tiny_gpt2, token_rows

COMMON = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=10, learning_rate=2e-3,
              weight_decay=0.01, max_grad_norm=1.0, warmup_steps=2, lr_scheduler_type="linear", logging_steps=1,
              save_strategy="no", report_to="none", disable_tqdm=True, seed=11, train_sampling_strategy="sequential")


def test_losses_match_transformers_trainer_over_ten_steps(tmp_path):
    rows = token_rows(40, seed=4)
    model = tiny_gpt2(seed=3)
    model.loss_type = "ForCausalLM"
    reference = Trainer(model=copy.deepcopy(model), data_collator=collate, train_dataset=rows,
                        args=TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, optim="adamw_torch",
                                               **COMMON))
    reference.train()
    ours = IPUTrainer(model=copy.deepcopy(model), ipu_config=IPUConfig(gradient_accumulation_steps=2),
                      data_collator=collate, train_dataset=rows,
                      args=IPUTrainingArguments(output_dir=str(tmp_path / "ipu"), device_type="cpu", **COMMON))
    ours.train()
    expected, got = losses(reference.state.log_history), losses(ours.state.log_history)
    assert len(expected) == len(got) == 10
    for step, (a, b) in enumerate(zip(expected, got), 1):
        assert math.isclose(a, b, rel_tol=1e-5), f"step {step}: transformers {a} vs IPUTrainer {b}"
    assert len(set(round(v, 4) for v in got)) > 5  # the model really trains: the losses move
