"""Settings: every constant a flag, --help, and bad input as one line with exit status 2."""
from __future__ import annotations

import pytest

import main_general
import user_input
from conftest import refused_settings, run_main


def test_every_constant_is_a_flag_with_help():
    text = user_input.build_parser("main_general.py").format_help()
    for key, value in user_input.defaults().items():
        flag = "--" + key.replace("_", "-")
        assert flag in text, flag
    assert "(default: 128)" in text and "(default: lambda)" in text
    assert set(user_input.defaults()) >= {"model", "dataset", "data_dir", "epochs", "batch_size", "lr",
                                           "warmup_epochs", "weight_decay", "adam_betas", "label_smoothing",
                                           "zero_init_residual", "heads", "qk_size", "stem", "seed", "device",
                                           "num_workers", "runs_dir", "checkpoint_dir", "checkpoint_every",
                                           "run_name", "resume", "max_batches"}


def test_flags_override_constants_with_their_types():
    config = user_input.parse_config(["--batch-size", "64", "--model", "baseline", "--lr", "1e-3",
                                      "--adam-betas", "0.8,0.99", "--zero-init-residual", "false"])
    assert config["batch_size"] == 64 and config["model"] == "baseline" and config["lr"] == 1e-3
    assert config["adam_betas"] == (0.8, 0.99) and config["zero_init_residual"] is False
    assert user_input.parse_config([])["epochs"] == user_input.EPOCHS


BAD_ARGUMENTS = [
    (["--epochs", "0"], "EPOCHS=0 must be >= 1"),
    (["--epochs", "ten"], "invalid int value"),
    (["--batch-size", "0"], "BATCH_SIZE=0 must be >= 1"),
    (["--lr", "0"], "LR=0.0 must be > 0"),
    (["--lr=-1e-3"], "LR=-0.001 must be > 0"),
    (["--model", "vit"], "MODEL='vit' is not one of baseline, lambda"),
    (["--dataset", "imagenet"], "DATASET='imagenet'"),
    (["--stem", "tiny"], "STEM='tiny'"),
    (["--device", "tpu"], "DEVICE='tpu'"),
    (["--heads", "3"], "HEADS=3 must divide"),
    (["--heads", "0"], "HEADS=0 must be >= 1"),
    (["--adam-betas", "0.9"], "expected two numbers"),
    (["--adam-betas", "0.9,1.5"], "ADAM_BETAS"),
    (["--label-smoothing", "1"], "LABEL_SMOOTHING"),
    (["--zero-init-residual", "maybe"], "expected true or false"),
    (["--run-name", "a/b"], "RUN_NAME"),
    (["--stem", "cifar"], "STEM=cifar"),
    (["--no-such-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv, expected", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_settings_exit_2_with_one_line(argv, expected, capsys):
    assert expected in refused_settings(argv, capsys)


def test_runtime_input_errors_exit_2(tmp_path, capsys):
    """Errors found after parsing (missing checkpoint, data dir that is a file) also give one line."""
    common = ["--runs-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main_general.main([*common, "--resume", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.pt does not exist")
    assert main_general.main([*common, "--resume", "latest"]) == 2
    assert "found no checkpoint" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main_general.main([*common, "--data-dir", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main_general.main([*common, "--device", "cpu", "--amp", "fp16"]) == 2  # a rule of the device: after parsing
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AMP=fp16 needs CUDA" in err
    assert not (tmp_path / "runs").exists()  # nothing was written for a run that never started


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    result = run_main(["--batch-size", "-4"], cwd=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == "main_general.py: error: BATCH_SIZE=-4 must be >= 1\n"
    assert "Traceback" not in result.stdout + result.stderr


def test_subprocess_help_lists_settings(tmp_path):
    result = run_main(["--help"], cwd=str(tmp_path))
    assert result.returncode == 0
    assert "--max-batches" in result.stdout and "--resume" in result.stdout


def test_docs_document_every_setting_and_the_readme_the_test_command():
    import os
    from conftest import ROOT

    def read(*path: str) -> str:
        with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
            return f.read()

    settings, readme, ci = read("docs", "settings.md"), read("README.md"), read(".ci", "run")
    for key in user_input.defaults():
        assert f"| `{key.upper()}` | `--{key.replace('_', '-')}` |" in settings, f"docs/settings.md lacks {key.upper()}"
    for command in ("pip install -r requirements.txt pytest pytest-xdist", "python -m pytest -q -n 2"):
        assert command in readme and command in ci
