"""Model and data flags shared by the four scripts, named as in the Hugging Face example scripts. Each script adds
its own objective's flags by subclassing `DataArguments`."""
import logging
from dataclasses import dataclass, field
from typing import Optional

from .errors import UserError

logger = logging.getLogger("ipu_train")

TEXT_EXTENSIONS = ("txt", "csv", "json", "jsonl", "parquet")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Pretrained model: a hub name or a local directory. Leave out to train from "
                                        "scratch with --model_type or --config_name."})
    model_type: Optional[str] = field(
        default=None, metadata={"help": "Model type to build from scratch (gpt2, bert, roberta, xlnet, ...)."})
    config_overrides: Optional[str] = field(
        default=None, metadata={"help": "Config values to change, e.g. 'n_embd=10,resid_pdrop=0.2'. Also allowed on "
                                        "top of a pretrained model (e.g. activation_function=gelu)."})
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config name or path, if not the same as model_name_or_path."})
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the same as model_name_or_path."})
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where to store models, tokenizers and datasets downloaded from the hub."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (Rust) tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: Optional[str] = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models and datasets defined in code on the hub. Only for code you "
                                         "have read and trust."})
    dtype: Optional[str] = field(
        default=None, metadata={"help": "Dtype the weights are loaded in.", "choices": DTYPES})
    torch_dtype: Optional[str] = field(
        default=None, metadata={"help": "Older name of --dtype.", "choices": DTYPES})

    def __post_init__(self):
        if self.torch_dtype is not None:
            if self.dtype not in (None, self.torch_dtype):
                raise UserError("--dtype and --torch_dtype disagree: pass only --dtype")
            self.dtype = self.torch_dtype
        if self.model_name_or_path is None and self.model_type is None and self.config_name is None:
            raise UserError("no model given: pass --model_name_or_path, or --model_type (or --config_name) to train "
                            "from scratch")
        if self.model_name_or_path is None and self.tokenizer_name is None:
            raise UserError("a model trained from scratch needs a tokenizer: pass --tokenizer_name (a directory made "
                            "by train_tokenizer.py, or a hub name)")


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Dataset name on the hub."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name."})
    train_file: Optional[str] = field(
        default=None, metadata={"help": f"Training data file ({', '.join(TEXT_EXTENSIONS)})."})
    validation_file: Optional[str] = field(
        default=None, metadata={"help": "Evaluation data file, same formats as --train_file."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only this many training samples (blocks after grouping, or lines "
                                        "with --line_by_line)."})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only this many evaluation samples (blocks after grouping)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of loading it; needs "
                                                             "--max_steps."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo the cached preprocessing."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percentage of the train split held out for evaluation when there is no "
                                     "validation split."})
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for preprocessing."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks in .txt files."})
    pack_sequences: bool = field(
        default=False, metadata={"help": "Pack several sequences into each row of --max_seq_length tokens (each "
                                         "attends only to itself), so that no compute goes to padding: pays where "
                                         "sequences are short against the row (masked LM only)."})
    max_sequences_per_pack: Optional[int] = field(
        default=None, metadata={"help": "With --pack_sequences, the most sequences one row holds (default 3)."})

    def training_source(self):
        """Where training data comes from (None: nowhere); scripts with other sources extend this."""
        return self.dataset_name or self.train_file

    def __post_init__(self):
        if self.training_source() is None and self.validation_file is None:
            raise UserError("no data given: pass --dataset_name, or --train_file / --validation_file")
        for flag in ("max_train_samples", "max_eval_samples"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise UserError(f"--{flag} {getattr(self, flag)}: keep at least 1 sample, or drop the flag")
        for flag in ("train_file", "validation_file"):
            path = getattr(self, flag)
            if path is not None and path.rsplit(".", 1)[-1] not in TEXT_EXTENSIONS:
                raise UserError(f"--{flag} {path}: use a {', '.join(TEXT_EXTENSIONS)} file")
        if not 0 < self.validation_split_percentage < 100:
            raise UserError("--validation_split_percentage must be between 1 and 99")
        if self.max_sequences_per_pack is not None and not self.pack_sequences:
            raise UserError(f"--max_sequences_per_pack {self.max_sequences_per_pack} has no effect without "
                            "--pack_sequences: add --pack_sequences, or drop --max_sequences_per_pack")
        if self.pack_sequences:
            if self.max_sequences_per_pack is None:
                self.max_sequences_per_pack = 3  # Krell et al.'s choice: almost all of packing's gain at BERT's lengths
            if self.max_sequences_per_pack < 1:
                raise UserError(f"--max_sequences_per_pack {self.max_sequences_per_pack}: a row holds at least 1 "
                                "sequence; 3 is usual")
            if self.streaming:
                raise UserError("--pack_sequences packs from the lengths of a whole split, which a stream does not "
                                "have: drop --streaming, or --pack_sequences")
            self.check_packing()

    def check_packing(self):
        """Whether this script can pack its sequences (--pack_sequences): only the masked-LM scripts can."""
        raise UserError("--pack_sequences packs masked-LM sequences (run_mlm.py --line_by_line, run_pretraining.py): "
                        "this script's objective attends across its whole block; drop --pack_sequences")

    def check_with(self, training_args):
        """Rules that involve the training flags too."""
        if self.streaming and training_args.do_train and training_args.max_steps <= 0:
            raise UserError("--streaming data has no length, so the number of steps is unknown: pass --max_steps")
        if training_args.compile_only and not training_args.do_train:
            raise UserError("--compile_only compiles the training step: add --do_train")
        if training_args.do_train and self.training_source() is None:
            raise UserError("--do_train needs --train_file or --dataset_name")
        if training_args.device_type == "ipu" and self.pack_sequences:
            # The PopTorch step takes a 2-D attention mask and no position ids (backends/poptorch.py: LossOnly).
            raise UserError("--pack_sequences is not available with --device ipu: the IPU step takes no block-diagonal "
                            "attention mask or position ids; drop --pack_sequences")
        stages = getattr(training_args, "pipeline_stages_across_processes", False)
        if stages and self.pack_sequences:
            # The stages pass a 2-D attention mask between them and read NSP at position 0 (process_stages.py).
            raise UserError("--pack_sequences is not available with --pipeline_stages_across_processes: the stages "
                            "take no block-diagonal attention mask or position ids; drop one of the two flags")
        if (training_args.device_type == "ipu" or stages) and getattr(self, "pad_to_max_length", True) is False:
            # An IPU executable takes the input shapes it was compiled for (poptorch python/_args_parser.py:
            # validateInputs refuses any other), and pipeline stages fix the shapes sent between them at their first
            # step (torch.distributed.pipelining), so no batch may be padded to its own longest sequence.
            reason = "--device ipu" if training_args.device_type == "ipu" else "--pipeline_stages_across_processes"
            logger.info("%s: --pad_to_max_length is on (every sequence padded to the same length)", reason)
            self.pad_to_max_length = True


def check_mlm_probability(mlm_probability):
    """--mlm_probability of the masked-LM scripts (run_mlm.py, run_pretraining.py): a share strictly between 0 and 1."""
    if not 0 < mlm_probability < 1:
        raise UserError(f"--mlm_probability {mlm_probability}: use a value between 0 and 1, e.g. 0.15")
