"""colab.ipynb: valid nbformat 4 JSON whose shell commands are the repository's documented commands."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex

import pytest

import compare_runs
import nntest
import user_input
from conftest import ROOT

PARSERS = {"main_general.py": lambda argv: user_input.parse_config(argv, prog="main_general.py"),
           "compare_runs.py": lambda argv: compare_runs.build_parser().parse_args(argv),
           "nntest.py": lambda argv: nntest.build_parser().parse_args(argv)}
SETUP = ("cd ", "git clone ", "pip install ")


def load(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def notebook() -> dict:
    return json.loads(load("colab.ipynb"))


def test_notebook_is_valid_nbformat_4(notebook):
    assert notebook["nbformat"] == 4 and isinstance(notebook["nbformat_minor"], int)
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None  # committed without outputs
    try:
        import nbformat
    except ImportError:  # not a dependency; the checks above are the schema's essentials
        return
    nbformat.validate(nbformat.reads(load("colab.ipynb"), as_version=4))


def code_lines(notebook: dict) -> list[str]:
    return [line.strip() for cell in notebook["cells"] if cell["cell_type"] == "code"
            for line in "".join(cell["source"]).splitlines()]


def shell_commands(notebook: dict) -> list[str]:
    """The notebook's `!` commands, with {NAME} replaced by the literal assigned to NAME in its cells."""
    values = {}
    for line in code_lines(notebook):
        match = re.fullmatch(r"([A-Z_]+) = (.+?)(\s+#.*)?", line)
        if match:
            values[match.group(1)] = str(ast.literal_eval(match.group(2)))
    return [re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "PLACEHOLDER.pt"), line[1:])
            for line in code_lines(notebook) if line.startswith("!")]


def test_notebook_commands_parse_and_are_documented(notebook):
    readme = load("README.md")
    commands = [c for c in shell_commands(notebook) if not c.startswith(SETUP)]
    scripts = [shlex.split(command)[1] for command in commands]
    assert {"main_general.py", "compare_runs.py", "nntest.py"} <= set(scripts)
    assert "--model baseline" in " ".join(commands) and "--model lambda" in " ".join(commands)
    for command in commands:
        program, script, *argv = shlex.split(command)
        assert program == "python" and script in PARSERS, command
        PARSERS[script](argv)  # exits (status 2) on an unknown flag or a bad value
        assert f"python {script}" in readme, f"README does not document {script}"
        for flag in (arg.split("=")[0] for arg in argv if arg.startswith("--")):
            assert f"`{flag}" in readme or f" {flag} " in readme, f"README does not mention {flag} of {script}"


def test_setup_commands_are_the_readme_installation(notebook):
    setup = [c for c in shell_commands(notebook) if c.startswith(SETUP)]
    assert any(c.startswith("git clone ") for c in setup)
    assert "pip install -q -r requirements.txt" in setup and "pip install -r requirements.txt" in load("README.md")
    assert "%tensorboard --logdir runs" in code_lines(notebook) and "tensorboard --logdir runs" in load("README.md")
