"""--pipeline_stages_across_processes from run_mlm.py (RoBERTa, DistilBERT) and run_plm.py (XLNet): a tiny model of 4
layers in 2 stages under `torchrun --nproc_per_node 2` logs the losses of the same run in one process (dropout off; the data
collators' random masks and permutations come from the same seed in every process)."""
import subprocess
import sys

import pytest

from .conftest import REPO
from .test_scripts_clm_mlm import logged_losses
from .test_stages_across_processes import ENV

ENCODER_NO_DROPOUT = ("num_hidden_layers=4,hidden_size=32,num_attention_heads=2,intermediate_size=64,"
                      "max_position_embeddings=66,hidden_dropout_prob=0,attention_probs_dropout_prob=0")
XLNET_NO_DROPOUT = "n_layer=4,d_model=32,n_head=2,d_head=16,d_inner=64,dropout=0"
DISTILBERT_NO_DROPOUT = ("n_layers=4,dim=32,n_heads=2,hidden_dim=64,max_position_embeddings=64,dropout=0,"
                         "attention_dropout=0")
SCRIPTS = {"mlm": ("run_mlm.py", "roberta", ENCODER_NO_DROPOUT), "plm": ("run_plm.py", "xlnet", XLNET_NO_DROPOUT),
           "mlm-distilbert": ("run_mlm.py", "distilbert", DISTILBERT_NO_DROPOUT)}


def training_args(script, text_files, tokenizer_dir, output_dir):
    """4 optimizer steps of 4 micro-batches of 2 sequences of 32 tokens, a loss logged every step, 2 stages."""
    _, model_type, overrides = SCRIPTS[script]
    return ["--model_type", model_type, "--config_overrides", overrides, "--tokenizer_name", str(tokenizer_dir),
            "--train_file", str(text_files / "train.txt"), "--max_seq_length", "32", "--do_train", "--max_steps", "4",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--seed", "0", "--report_to", "none",
            "--disable_tqdm", "true", "--device", "cpu", "--ipu_config_overrides", "layers_per_ipu=[2 2]",
            "--output_dir", str(output_dir)]


def run(script, argv, processes):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 \
        else []
    done = subprocess.run([sys.executable, *launcher, str(REPO / SCRIPTS[script][0]), *argv], capture_output=True,
                          text=True, cwd=REPO, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_two_stages_on_two_processes_log_the_losses_of_one_process(script, text_files, roberta_tokenizer_dir,
                                                                   unigram_tokenizer_dir, wordpiece_tokenizer_dir,
                                                                   tmp_path):
    tokenizer_dir = {"mlm": roberta_tokenizer_dir, "plm": unigram_tokenizer_dir,
                     "mlm-distilbert": wordpiece_tokenizer_dir}[script]
    one, two = tmp_path / "one", tmp_path / "two"
    run(script, training_args(script, text_files, tokenizer_dir, one), processes=1)
    run(script, training_args(script, text_files, tokenizer_dir, two) + ["--pipeline_stages_across_processes"],
        processes=2)
    one, two = logged_losses(one), logged_losses(two)
    assert len(one) == len(two) == 4 and one[-1] < one[0]
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    assert worst < 1e-5, f"relative loss difference {worst:.1e}: {one} vs {two}"
