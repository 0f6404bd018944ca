"""compare_runs.py (table, plot, run discovery, errors), figures.line_chart, and a real smoke run
read back by compare_runs.py, nntest.py and TensorBoard."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import compare_runs
import nntest
import user_input
from conftest import SMOKE_FLAGS, run_main
from figures import DPI, PALETTE, Panel, Series, line_chart
from log_data import read_metrics


def record(epoch: int, test_acc: float, epoch_time_s: float, test_time_s: float, img_per_s: float) -> dict:
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "train_acc": test_acc - 5, "test_loss": 2.5 / epoch,
            "test_acc": test_acc, "lr": 1e-3, "epoch_time_s": epoch_time_s, "train_img_per_s": img_per_s,
            "test_time_s": test_time_s}


def write_run(folder, model: str, records: list[dict], epochs: int = 5, unfinished_line: str = "") -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**user_input.defaults(), "model": model, "epochs": epochs}))
    with open(folder / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(unfinished_line)  # a record being written by a run in progress
    return str(folder)


def test_table_and_plot_for_runs_of_different_lengths(tmp_path, capsys):
    baseline = write_run(tmp_path / "runs" / "Baseline" / "b", "baseline",
                         [record(1, 50, 10, 2, 100), record(2, 70, 10, 2, 200), record(3, 65, 10, 2, 300)])
    running = write_run(tmp_path / "runs" / "Lambda" / "l", "lambda",
                        [record(1, 40, 100, 5, 50), record(2, 45, 95, 5, 70)], unfinished_line='{"epoch": 3, "tr')
    started = write_run(tmp_path / "runs" / "Lambda" / "s", "lambda", [], epochs=90)
    out = tmp_path / "report"
    assert compare_runs.main([baseline, running, started, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = ["| Baseline/b | baseline | 23,528,522 | 3/5 | 70.00 | 2 | 65.00 | 0 m 36 s | 200 |",
            "| Lambda/l | lambda | 12,971,450 | 2/5 | 45.00 | 2 | 45.00 | 3 m 25 s | 60 |",
            "| Lambda/s | lambda | 12,971,450 | 0/90 | - | - | - | - | - |"]
    markdown = (out / "comparison.md").read_text()
    assert markdown.splitlines()[2:] == rows and markdown in printed
    image = np.asarray(Image.open(out / "comparison.png").convert("RGB")).astype(int)
    for color in PALETTE[:2]:  # both runs are drawn
        rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
        assert (abs(image - rgb).sum(axis=-1) < 30).sum() > 500


def test_time_axis_unit_and_total_time_format():
    assert compare_runs.time_unit(90) == ("s", 1.0) and compare_runs.time_unit(205) == ("min", 60.0)
    assert compare_runs.time_unit(4 * 3600) == ("h", 3600.0)
    assert compare_runs.format_time(4649) == "1 h 17 m 29 s" and compare_runs.format_time(59.6) == "1 m 00 s"


def test_default_is_the_newest_run_of_each_model(tmp_path, capsys):
    runs = tmp_path / "runs"
    old = write_run(runs / "Baseline" / "old", "baseline", [record(1, 10, 1, 1, 1)])
    write_run(runs / "Baseline" / "new", "baseline", [record(1, 20, 1, 1, 1)])
    write_run(runs / "Lambda" / "only", "lambda", [record(1, 30, 1, 1, 1)])
    os.utime(os.path.join(old, "metrics.jsonl"), (1, 1))  # written long ago
    assert compare_runs.main(["--runs-dir", str(runs), "--out", str(tmp_path / "out")]) == 0
    labels = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert labels[1:] == ["| Baseline/new", "| Lambda/only"]  # after the header


def test_bad_run_directories_are_one_line_with_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    broken = write_run(tmp_path / "broken", "lambda", [record(1, 10, 1, 1, 1)])
    with open(os.path.join(broken, "metrics.jsonl"), "a") as f:
        f.write("not json\n")
    cases = [([str(tmp_path / "empty")], "empty has no metrics.jsonl"),
             ([broken], "is not valid JSON"),
             (["--runs-dir", str(tmp_path / "nothing")], "no runs found under")]
    for argv, expected in cases:
        assert compare_runs.main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("compare_runs.py: error: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_read_metrics_skips_only_an_unfinished_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert read_metrics(str(path)) == [{"epoch": 1}, {"epoch": 2}]


def test_line_chart_draws_each_series_with_its_style_band_and_one_legend(tmp_path):
    """Non-finite points are left out, a dashed series is dashed, low/high make a band, log axes
    are log, a label drawn in two panels is one legend entry; the PNG is written at the set size."""
    import matplotlib.pyplot as plt
    nan = float("nan")
    flat = Series("flat", [0, 10], [5, 5], "#ff0000")
    rise = Series("rise", [0, 5, 10], [0, nan, 10], dashed=True, low=[-1, nan, 9], high=[1, nan, 11])
    growth = Series("flat", [8, 16, 32], [1, 10, 100], "#ff0000")
    figure = line_chart([Panel("linear", "time (s)", "accuracy (%)", [flat, rise]),
                         Panel("log", "map side", "memory (MB)", [growth], x_log=2, y_log=10)],
                        str(tmp_path / "chart.png"), title="a title")
    linear, log = figure.axes
    (flat_line, rise_line), (growth_line,) = linear.get_lines(), log.get_lines()
    assert flat_line.get_xydata().tolist() == [[0, 5], [10, 5]] and flat_line.get_linestyle() == "-"
    assert rise_line.get_xydata().tolist() == [[0, 0], [10, 10]] and rise_line.get_linestyle() == "--"
    assert rise_line.get_color() == PALETTE[1]  # the second distinct label, no colour given
    (band,) = linear.collections
    band_y = band.get_paths()[0].vertices[:, 1]
    assert band_y.min() == -1 and band_y.max() == 11
    assert (log.get_xscale(), log.get_yscale()) == ("log", "log") and linear.get_xscale() == "linear"
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["flat", "rise"]
    assert (linear.get_xlabel(), linear.get_ylabel()) == ("time (s)", "accuracy (%)")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "chart.png") as image:
        assert image.size == (round(2 * 5.6 * DPI), round(figure.get_figheight() * DPI))
        assert len(image.convert("RGB").getcolors(maxcolors=2 ** 20)) > 50  # drawn, not blank
    assert plt.get_fignums() == []  # nothing left in pyplot's list of open figures


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One epoch of the baseline through main_general.py, as a user runs it."""
    work = tmp_path_factory.mktemp("compare")
    result = run_main([*SMOKE_FLAGS, "--model", "baseline", "--data-dir", "data", "--epochs", "1",
                       "--run-name", "smoke"], cwd=str(work))
    assert result.returncode == 0, result.stderr
    return work


def test_smoke_run_has_per_class_accuracy_confusion_image_and_hparams(smoke_run):
    events = EventAccumulator(str(smoke_run / "runs" / "Baseline" / "smoke"))
    events.Reload()
    per_class = [tag for tag in events.Tags()["scalars"] if tag.startswith("Accuracy_per_class/")]
    assert 1 <= len(per_class) <= 10 and "Accuracy_per_class/horizontal-2" in per_class
    assert [image.step for image in events.Images("Confusion/test")] == [1]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_compare_and_nntest_read_the_smoke_run(smoke_run, capsys, monkeypatch):
    monkeypatch.chdir(smoke_run)
    assert compare_runs.main([]) == 0
    assert "| Baseline/smoke | baseline | 23,528,522 | 1/1 |" in capsys.readouterr().out
    assert (smoke_run / "comparison" / "comparison.png").is_file()
    logged = read_metrics(str(smoke_run / "runs" / "Baseline" / "smoke" / "metrics.jsonl"))[0]["test_acc"]
    assert nntest.main(["--checkpoint", os.path.join("checkpoints", "Baseline", "smoke", "best.pt")]) == 0
    assert f"top-1 accuracy {logged:.2f}%" in capsys.readouterr().out  # same weights, same 2 test batches
