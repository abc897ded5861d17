"""Run by tests/test_trainer_ddp.py under `torchrun --nproc_per_node 2`: trains the tiny GPT-2 with one replica per
process and writes what the test compares (losses, eval loss, who wrote what) to <output_dir>/result-<rank>.json."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ipu_train.arguments import IPUTrainingArguments, load_ipu_config  # noqa: E402
from ipu_train.trainer import IPUTrainer  # noqa: E402
from tests._trainer_fixtures import collate, losses, tiny_gpt2, token_rows  # noqa: E402

ROWS, EVAL_ROWS = 40, 11


def run(output_dir, micro_batch, accumulation, sharded=False, resume_from=None, replicas=None):
    """`sharded`: replicated_tensor_sharding (the optimizer state split over the replicas); `resume_from`: a
    checkpoint to continue from; `replicas`: a replication_factor (default: the number of processes)."""
    overrides = f"replicated_tensor_sharding={sharded}" + (f",replication_factor={replicas}" if replicas else "")
    args = IPUTrainingArguments(output_dir=output_dir, device_type="cpu", per_device_train_batch_size=micro_batch,
                                gradient_accumulation_steps=accumulation, per_device_eval_batch_size=4,
                                max_steps=10, learning_rate=2e-3, logging_steps=1, save_strategy="steps",
                                save_steps=5, report_to="none", disable_tqdm=True, seed=5,
                                ipu_config_overrides=overrides)
    trainer = IPUTrainer(model=tiny_gpt2(seed=3), ipu_config=load_ipu_config(args), args=args,
                         data_collator=collate, train_dataset=token_rows(ROWS, seed=4),
                         eval_dataset=token_rows(EVAL_ROWS, seed=6))
    trainer.train(resume_from_checkpoint=resume_from)
    eval_loss = trainer.evaluate()["eval_loss"]
    return {"losses": losses(trainer.state.log_history), "eval_loss": eval_loss,
            "replication_factor": trainer.ipu_config.replication_factor, "world_size": args.world_size,
            "optimizer": type(trainer.optimizer).__name__}


if __name__ == "__main__":
    output_dir, micro_batch, accumulation = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sharded = len(sys.argv) > 4 and sys.argv[4] == "sharded"
    result = run(output_dir, micro_batch, accumulation, sharded, sys.argv[5] if len(sys.argv) > 5 else None)
    with open(os.path.join(output_dir, f"result-{os.environ.get('RANK', '0')}.json"), "w") as handle:
        json.dump(result, handle)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # both ranks done with the group before either leaves it
        torch.distributed.destroy_process_group()  # a clean shutdown: no abort while the other rank exits
