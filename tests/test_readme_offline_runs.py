"""Every offline README example (the ones on local files: the tokenizer commands, then the training commands that
use them) runs as written, with `--max_steps 2` added: it exits 0 and writes what it says it writes. The README
promises that `--max_steps 20` tries any command quickly; this keeps that true, along with every flag, path and
order of the examples. The commands are taken from README.md (test_readme_commands' extraction) and run in-process
through each script's main(argv), from a temporary directory: `output/...` is written there and `data/...` and
`ipu_configs/...` are read from the repository."""
import json

import pytest

import run_clm
import run_mlm
import run_plm
import run_pretraining
import train_tokenizer

from .conftest import REPO
from .test_readme_commands import PLACEHOLDER, readme_commands

MAINS = {"train_tokenizer.py": train_tokenizer.main, "run_clm.py": run_clm.main, "run_mlm.py": run_mlm.main,
         "run_pretraining.py": run_pretraining.main, "run_plm.py": run_plm.main}
LOCAL_INPUTS = ("--files", "--train_file", "--dataset_path")  # an offline example reads local files
WRITES = ("--output_dir", "--save_preprocessed_dataset")  # any other `output/...` argument is an earlier one's output
OUTPUT = "output/"
STEPS = 2
# Added to every training command. --max_eval_samples only bounds evaluation (the whole validation file takes longer
# than the two training steps); --do_eval stays, so evaluation and its metrics file are still run and written.
QUICK = ["--max_steps", str(STEPS), "--max_eval_samples", "16"]


def offline_commands():
    return [command for command in readme_commands()
            if command.script in MAINS and PLACEHOLDER not in command.argv
            and any(flag in command.argv for flag in LOCAL_INPUTS)]


def flag_values(argv, names):
    return [argv[at + 1] for at, word in enumerate(argv[:-1]) if word in names]


def written(command):
    """The README paths (output/...) that `command` writes."""
    return [path for path in flag_values(command.argv, WRITES) if path.startswith(OUTPUT)]


def read(command):
    """The README paths (output/...) that `command` reads: an earlier command's output."""
    return [word for word in command.argv if word.startswith(OUTPUT) and word not in written(command)]


def writes(command, path):
    return any(path == out or path.startswith(out.rstrip("/") + "/") for out in written(command))


class ReadmeRuns:
    """Runs README commands in a temporary directory, each at most once, a command's producers first (the command
    that writes each output/... path it reads)."""

    def __init__(self, commands, root):
        self.commands, self.root, self.outcomes = commands, root, {}

    def local(self, word):
        if word.startswith(OUTPUT):
            return str(self.root / word)
        first = word.split("/")[0]
        if "/" in word and first not in (".", "..") and (REPO / first).is_dir():  # data/corpus/..., ipu_configs/...
            return str(REPO / word)
        return word

    def argv(self, command):
        argv = [self.local(word) for word in command.argv]
        return argv if command.script == "train_tokenizer.py" else argv + QUICK

    def producer(self, command, path):
        earlier = [other for other in self.commands if other.line < command.line and writes(other, path)]
        if not earlier:
            pytest.fail(f"README.md:{command.line} reads {path}, which no offline example before it writes")
        return earlier[-1]

    def run(self, command):
        """The command's exit code (0 for success); its producers' failures fail the caller."""
        if command.line not in self.outcomes:
            for path in read(command):
                producer = self.producer(command, path)
                if self.run(producer) != 0:
                    pytest.fail(f"README.md:{producer.line} ({producer.script}), which writes {path}, failed")
            try:
                code = MAINS[command.script](self.argv(command))
            except SystemExit as stop:
                code = stop.code
            except Exception:
                self.outcomes[command.line] = "a traceback"  # what depends on it fails without running it again
                raise
            self.outcomes[command.line] = 0 if code is None else code
        return self.outcomes[command.line]


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory):
    """Shared by the module's tests, so that each command (the tokenizer trainings above all, on the full corpus) runs
    once however many commands depend on it."""
    root = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # anything written to a relative path lands here, not in the repository
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            patch.setenv(name, "1")
        yield ReadmeRuns(offline_commands(), root)


@pytest.mark.parametrize("command", [pytest.param(command, id=f"README.md:{command.line}:{command.script}")
                                     for command in offline_commands()])
def test_readme_offline_example_runs(command, readme_runs, monkeypatch):
    monkeypatch.chdir(readme_runs.root)
    assert readme_runs.run(command) == 0, "exit code (its error is in the captured stderr)"
    for path in written(command):
        assert (readme_runs.root / path).is_dir(), path
    output_dir = readme_runs.root / flag_values(command.argv, ["--output_dir"])[-1]
    if command.script == "train_tokenizer.py":
        assert (output_dir / "tokenizer.json").is_file()
        return
    for name in ("config.json", "model.safetensors", "ipu_config.json", "train_results.json", "eval_results.json"):
        assert (output_dir / name).is_file(), name
    # Trained the steps asked for: a run that resumed a finished one (its output_dir reused) trains none.
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == STEPS


def test_every_offline_example_is_found():
    """The filter above cannot pass by finding nothing: each script has an offline example, and the pretraining
    example that starts from saved pairs (--dataset_path) is one of them."""
    commands = offline_commands()
    assert {command.script for command in commands} == set(MAINS)
    assert any("--dataset_path" in command.argv for command in commands)
    for at, command in enumerate(commands):  # and what each one reads, an earlier one writes
        for path in read(command):
            assert any(writes(earlier, path) for earlier in commands[:at]), f"README.md:{command.line}: {path}"
