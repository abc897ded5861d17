"""Every command in README.md that runs one of our scripts parses with that script's own parser, flag by flag: a
flag renamed or dropped in the code, or mistyped in the README, fails here. Nothing is trained, loaded or written."""
import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass

import pytest

import run_clm
import run_mlm
import run_plm
import run_pretraining
import train_tokenizer
from ipu_train import plan
from ipu_train.arguments import IPUTrainingArguments
from ipu_train.cli import ScriptArgumentParser
from ipu_train.script_args import ModelArguments

from .conftest import REPO

TRAINING_SCRIPTS = {"run_clm.py": run_clm, "run_mlm.py": run_mlm, "run_pretraining.py": run_pretraining,
                    "run_plm.py": run_plm}
# Their parsers are built inside parse_args(argv), which exits with code 2 on a mistake.
TOOLS = {"train_tokenizer.py": train_tokenizer.parse_args, "ipu_train.plan": plan.parse_args}
SCRIPTS = {*TRAINING_SCRIPTS, *TOOLS}
PLACEHOLDER = "..."
LAUNCHERS = ("python", "python3", "torchrun")


@dataclass
class Command:
    line: int  # in README.md, where the command starts
    script: str
    argv: list


def code_blocks(text):
    """(line number of the first line, lines) of every fenced block."""
    for match in re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        yield text.count("\n", 0, match.start(1)) + 1, match.group(1).splitlines()


def logical_lines(first_line, lines):
    """(line number, text) of each shell line, with backslash-continued lines joined."""
    start, pending = first_line, ""
    for number, line in enumerate(lines, first_line):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def script_and_argv(line):
    """(script, arguments) when the line runs one of ours, directly, with `python -m` or under torchrun; else
    None. Trailing `# comments` are dropped. Only python and torchrun lines are read as shell: other blocks hold
    listings and prose."""
    if os.path.basename(next(iter(line.split()), "")) not in LAUNCHERS:
        return None
    words = shlex.split(line, comments=True)
    for at, word in enumerate(words):
        if word in SCRIPTS:
            return word, words[at + 1:]
    return None


def readme_commands():
    """Every README command that runs one of our scripts. A `...` in one stands for "the same run": it is replaced
    by the arguments of the block's previous command of the same script. Where there is none (the torchrun lines,
    `run_clm.py ...`), the line is a pattern, not a command: it is kept, to be reported as skipped."""
    commands = []
    for first_line, lines in code_blocks((REPO / "README.md").read_text(encoding="utf-8")):
        previous = {}
        for number, line in logical_lines(first_line, lines):
            found = script_and_argv(line)
            if found is None:
                continue
            script, argv = found
            if PLACEHOLDER in argv and script in previous:
                at = argv.index(PLACEHOLDER)
                argv = argv[:at] + previous[script] + argv[at + 1:]
            previous[script] = argv
            commands.append(Command(number, script, argv))
    return commands


def as_param(command):
    pattern = PLACEHOLDER in command.argv
    return pytest.param(command, id=f"README.md:{command.line}:{command.script}",
                        marks=[pytest.mark.skip(reason="a pattern: `...` stands for any flags")] if pattern else [])


def training_script_help(module, argv):
    """Parse `argv` as the script does (workflow.start's parser, with the script's own ModelArguments where it has
    them); its --help text."""
    model_arguments = getattr(module, "ModelArguments", ModelArguments)
    parser = ScriptArgumentParser((model_arguments, module.DataTrainingArguments, IPUTrainingArguments))
    parser.parse_script_args(argv)
    return parser.format_help()


def tool_help(parse_args, argv):
    try:
        parse_args(argv)
    except SystemExit:
        pytest.fail("does not parse: argparse's error is in the captured stderr")
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as help_text:
        parse_args(["--help"])
    return help_text.getvalue()


def flags(argv):
    return {word.split("=")[0] for word in argv if word.startswith("--")}


@pytest.mark.parametrize("command", [as_param(command) for command in readme_commands()])
def test_readme_command_parses_with_the_scripts_own_parser(command, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's relative paths are the repository's
    if command.script in TRAINING_SCRIPTS:
        help_text = training_script_help(TRAINING_SCRIPTS[command.script], command.argv)
    else:
        help_text = tool_help(TOOLS[command.script], command.argv)
    # argparse also takes an unambiguous prefix of a flag (--learning_rat): the README must spell flags in full.
    assert flags(command.argv) <= set(re.findall(r"--[\w-]+", help_text))


def test_readme_commands_run_every_script():
    """The extraction finds something for each script, so the test above cannot pass by finding nothing."""
    assert {command.script for command in readme_commands()} == SCRIPTS
