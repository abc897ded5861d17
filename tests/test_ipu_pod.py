"""IPU-POD smoke tests, `pytest -m ipu`: each script trains a few steps with its shipped IPU configuration on real
IPUs, and every shipped configuration compiles for an offline IPU target (--compile_only). They need the Poplar
SDK's PopTorch (see the README, "On an IPU-POD") and are skipped wherever it is not installed: our CI has no IPUs
and checks the IPU path against PopTorch's API only (tests/poptorch_double.py)."""
import importlib.util

import pytest

import run_clm
import run_mlm
import run_plm
import run_pretraining
from ipu_train.pipeline.families import FAMILIES

from .conftest import REPO



def _sdk_installed():
    try:
        return importlib.util.find_spec("poptorch") is not None
    except ValueError:  # a test double in sys.modules has no spec
        return False


pytestmark = [
    pytest.mark.ipu,
    pytest.mark.skipif(not _sdk_installed(),
                       reason="PopTorch is not installed (it comes with the Poplar SDK): these run on an IPU-POD"),
]

# (script, its model type, the tokenizer fixture made for it) for each family's shipped configurations
SCRIPTS = {"gpt2": (run_clm, "gpt2_tokenizer"), "bert": (run_pretraining, "wordpiece_tokenizer_dir"),
           "roberta": (run_mlm, "roberta_tokenizer_dir"), "distilbert": (run_mlm, "wordpiece_tokenizer_dir"),
           "albert": (run_mlm, "wordpiece_tokenizer_dir"), "xlnet": (run_plm, "unigram_tokenizer_dir")}
SHIPPED = {directory: (family.model_types[0], shipped.sizes) for family in FAMILIES
           for directory, shipped in family.shipped_sizes.items()}
CORPUS = REPO / "data" / "corpus"
SEQUENCE = {run_clm: "--block_size", run_mlm: "--max_seq_length", run_pretraining: "--max_seq_length",
            run_plm: "--max_seq_length"}


@pytest.fixture
def gpt2_tokenizer(bpe_tokenizer_dir):
    return bpe_tokenizer_dir


def _argv(directory, tokenizer, output_dir, *flags):
    """The shipped configuration as published (its accumulation included: up to 512 micro-batches a step, so the
    whole bundled corpus, the last combined batch completed with --pad_on_batch_axis)."""
    model_type, sizes = SHIPPED[directory]
    script, _ = SCRIPTS[model_type]
    overrides = ",".join(f"{key}={value}" for key, value in sizes.items())
    return script, ["--model_type", model_type, "--config_overrides", overrides, "--tokenizer_name", str(tokenizer),
                    "--train_file", str(CORPUS / "train.txt"), "--validation_file", str(CORPUS / "validation.txt"),
                    SEQUENCE[script], "128", "--pad_on_batch_axis",
                    "--ipu_config_name", str(REPO / "ipu_configs" / directory), "--device", "ipu",
                    "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
                    "--report_to", "none", "--output_dir", str(output_dir), *flags]


def _run(script, argv):
    try:
        script.main(argv)
    except SystemExit as stop:
        assert stop.code in (0, None), f"{script.__name__} exited with {stop.code}"


@pytest.mark.parametrize("directory", ["gpt2", "roberta-base", "bert-base", "xlnet-base"])
def test_each_script_trains_and_evaluates_on_ipus(directory, tmp_path, request):
    model_type, _ = SHIPPED[directory]
    tokenizer = request.getfixturevalue(SCRIPTS[model_type][1])
    script, argv = _argv(directory, tokenizer, tmp_path / "out", "--do_train", "--do_eval",
                         "--max_steps", "3", "--max_eval_samples", "16", "--logging_steps", "1")
    _run(script, argv)
    assert (tmp_path / "out" / "ipu_config.json").is_file() and (tmp_path / "out" / "eval_results.json").is_file()


@pytest.mark.parametrize("directory", sorted(SHIPPED))  # every ipu_configs/ directory (tests/test_families.py)
def test_every_shipped_configuration_compiles(directory, tmp_path, request):
    model_type, _ = SHIPPED[directory]
    tokenizer = request.getfixturevalue(SCRIPTS[model_type][1])
    script, argv = _argv(directory, tokenizer, tmp_path / "out", "--do_train", "--compile_only")
    _run(script, argv)

