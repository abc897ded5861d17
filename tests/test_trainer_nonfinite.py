"""A diverging run shows: NaN losses are filtered from a logging window's mean only while some step was finite
(`--logging_nan_inf_filter`, on by default as in transformers.Trainer), and a window of NaN steps logs NaN. The runs
end on a finite step: a run whose last loss is NaN writes no model (tests/test_checkpoints.py)."""
import math

import pytest
import torch

from ipu_train import IPUConfig, IPUTrainer, IPUTrainingArguments

from ._trainer_fixtures import collate, losses, tiny_gpt2, token_rows


def nan_loss_on_odd_steps(model):
    """Adds NaN to the loss of every other forward: the loss reads NaN, the gradients stay finite."""
    calls = [0]

    def hook(module, args, kwargs, output):
        if calls[0] % 2:
            output.loss = output.loss + torch.tensor(float("nan"))
        calls[0] += 1
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def logged_losses(tmp_path, logging_steps, nan_filter):
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_type="cpu", per_device_train_batch_size=2,
                                max_steps=5, logging_steps=logging_steps, learning_rate=1e-3, report_to="none",
                                save_strategy="no", disable_tqdm=True, logging_nan_inf_filter=nan_filter,
                                max_grad_norm=0.0)
    trainer = IPUTrainer(model=nan_loss_on_odd_steps(tiny_gpt2()), ipu_config=IPUConfig(), args=args,
                         train_dataset=token_rows(8), data_collator=collate)
    trainer.train()
    return losses(trainer.state.log_history)


@pytest.mark.parametrize("nan_filter", [True, False])
def test_a_window_of_nan_steps_logs_nan(tmp_path, nan_filter):
    logged = logged_losses(tmp_path, logging_steps=1, nan_filter=nan_filter)
    assert [math.isnan(loss) for loss in logged] == [False, True, False, True, False]


def test_the_filter_keeps_the_finite_mean_and_can_be_turned_off(tmp_path):
    filtered = logged_losses(tmp_path / "on", logging_steps=2, nan_filter=True)
    assert len(filtered) == 2 and all(math.isfinite(loss) for loss in filtered)
    # Each window of two steps holds one finite loss (steps 1 and 3): its mean is that loss, not half of it.
    per_step = logged_losses(tmp_path / "each", logging_steps=1, nan_filter=True)
    assert filtered == pytest.approx([per_step[0], per_step[2]], rel=1e-6)
    unfiltered = logged_losses(tmp_path / "off", logging_steps=2, nan_filter=False)
    assert len(unfiltered) == 2 and all(math.isnan(loss) for loss in unfiltered)
