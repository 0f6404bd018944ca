"""compare_runs.py and run_comparison.py (table, plot, run discovery, errors), figures.line_chart,
and a real smoke run read back by compare_runs.py, nntest.py and TensorBoard."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import compare_runs
import nntest
import run_comparison
import user_input
from conftest import SMOKE_FLAGS, run_main
from figures import DPI, PALETTE, Panel, Series, line_chart
from log_data import read_metrics


def record(epoch: int, test_acc: float, epoch_time_s: float, test_time_s: float, img_per_s: float) -> dict:
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "train_acc": test_acc - 5, "test_loss": 2.5 / epoch,
            "test_acc": test_acc, "lr": 1e-3, "epoch_time_s": epoch_time_s, "train_img_per_s": img_per_s,
            "test_time_s": test_time_s}


def write_run(folder, model: str, records: list[dict], epochs: int = 5, unfinished_line: str = "", **settings) -> str:
    folder.mkdir(parents=True)
    config = {**user_input.defaults(), "model": model, "epochs": epochs, **settings}
    (folder / "config.json").write_text(json.dumps(config))
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
    rows = ["| Baseline/b | baseline | 23,528,522 | 3/5 | 65.00 | - | 70.00 (2) | 0 m 36 s | 200 |",
            "| Lambda/l | lambda | 12,971,450 | 2/5 | 45.00 | - | 45.00 (2) | 3 m 25 s | 60 |",
            "| Lambda/s | lambda | 12,971,450 | 0/90 | - | - | - | - | - |"]
    markdown = (out / "comparison.md").read_text()
    assert markdown.splitlines()[4:7] == rows and markdown in printed
    image = np.asarray(Image.open(out / "comparison.png").convert("RGB")).astype(int)
    for color in PALETTE[:2]:  # both runs are drawn
        rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
        assert (abs(image - rgb).sum(axis=-1) < 30).sum() > 500


def seeded_runs(root, model: str, finals: list[float], **settings) -> list[str]:
    """One run per seed, 2 epochs each; the best epoch is the last, at `finals[seed]` %."""
    return [write_run(root / model.capitalize() / f"{model}-{'-'.join(map(str, settings.values()))}-s{seed}", model,
                      [record(1, 10, 10, 2, 100), record(2, final, 20, 2, 300)], epochs=2, seed=seed,
                      run_name=f"s{seed}", device=["cpu", "cuda"][seed % 2], num_workers=seed, **settings)
            for seed, final in enumerate(finals)]


def test_runs_differing_only_in_seed_form_groups_with_mean_std_and_welch_interval(tmp_path, capsys):
    runs = tmp_path / "runs"
    baseline = seeded_runs(runs, "baseline", [70.0, 71.0, 72.0], heads=8)  # lambda settings do not split a baseline
    lambda_ = seeded_runs(runs, "lambda", [73.0, 74.0, 75.0])
    assert compare_runs.main([*baseline, *lambda_, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    # mean 71 and 74, std 1 each; equal n and variances: df 4, half width t(0.975, 4) sqrt(2/3) = 2.2669
    assert "| baseline | 3 | 0, 1, 2 | 23,528,522 | 2/2 | 71.00 ± 1.00 | - | 71.00 ± 1.00 | 0 m 34 s | 200 |" in printed
    assert "| lambda | 3 | 0, 1, 2 | 12,971,450 | 2/2 | 74.00 ± 1.00 | - | 74.00 ± 1.00 | 0 m 34 s | 200 |" in printed
    assert "| lambda − baseline | MODEL | 3 vs 3 | +3.00 [+0.73, +5.27] (df 4.0): lambda higher | - |" in printed


def test_final_accuracy_is_primary_then_the_test_accuracy_at_the_best_validation_epoch(tmp_path, capsys):
    """Runs with a validation split: the final epoch's test top-1, the test top-1 where validation
    peaked, and the best test top-1 (chosen on the test set) are three different figures; the Welch
    intervals are of the first two."""
    def run(model: str, seed: int, tests: list[float], vals: list[float]) -> str:
        records = [{**record(epoch, test, 10, 2, 100), "val_acc": val, "val_loss": 1.0}
                   for epoch, (test, val) in enumerate(zip(tests, vals), start=1)]
        return write_run(tmp_path / "runs" / model.capitalize() / f"s{seed}", model, records, epochs=3, seed=seed,
                         val_size=500)
    found = [run("baseline", 0, [60, 70, 65], [61, 60, 64]), run("baseline", 1, [62, 72, 67], [63, 62, 66]),
             run("lambda", 0, [70, 80, 60], [70, 75, 71]), run("lambda", 1, [72, 82, 62], [72, 77, 73])]
    assert compare_runs.main([*found, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| Baseline/s0 | baseline | 23,528,522 | 3/3 | 65.00 | 65.00 (3) | 70.00 (2) |" in printed
    assert "| Lambda/s1 | lambda | 12,971,450 | 3/3 | 62.00 | 82.00 (2) | 82.00 (2) |" in printed
    assert "| final test top-1 | test top-1 at best val | best test top-1 (selected on test) |" in printed
    assert "| baseline | 2 | 0, 1 | 23,528,522 | 3/3 | 66.00 ± 1.41 | 66.00 ± 1.41 | 71.00 ± 1.41 |" in printed
    assert "| lambda | 2 | 0, 1 | 12,971,450 | 3/3 | 61.00 ± 1.41 | 81.00 ± 1.41 | 81.00 ± 1.41 |" in printed
    differences = next(line for line in printed.splitlines() if line.startswith("| lambda − baseline"))
    cells = differences.split(" | ")
    # n = 2 and std sqrt(2) each: df 2, half width t(0.975, 2) sqrt(2) sqrt(2 / 2) = 6.08
    assert cells[3] == "-5.00 [-11.08, +1.08] (df 2.0): no clear difference (the interval contains 0)"  # primary
    assert cells[4] == "+15.00 [+8.92, +21.08] (df 2.0): lambda higher |"


def test_single_runs_are_groups_of_one_and_too_few_to_tell(tmp_path, capsys):
    runs = tmp_path / "runs"
    found = seeded_runs(runs, "baseline", [70.0]) + seeded_runs(runs, "lambda", [73.0, 76.0])
    assert compare_runs.main([*found, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| baseline | 1 | 0 | 23,528,522 | 2/2 | 70.00 (1 run: no std) |" in printed
    assert "| lambda | 2 | 0, 1 | 12,971,450 | 2/2 | 74.50 ± 2.12 |" in printed
    assert "| +4.50: too few runs to tell (n = 2 vs 1; need 2 or more seeds in each group) |" in printed


def test_data_dir_splits_groups_only_for_image_folders(tmp_path):
    runs = tmp_path / "runs"
    cifar = [run_comparison.Run(path) for path in seeded_runs(runs, "baseline", [50.0, 60.0])]
    cifar[1].config["data_dir"] = "/elsewhere"
    folders = [run_comparison.Run(path) for path in seeded_runs(runs, "lambda", [50.0, 60.0], dataset="folder")]
    folders[1].config["data_dir"] = "/other_images"
    assert [len(group.runs) for group in run_comparison.group_runs(cifar + folders)] == [2, 1, 1]


def test_groups_are_paired_where_they_differ_in_one_setting(tmp_path):
    runs = tmp_path / "runs"
    found = [run_comparison.Run(path) for model in ("baseline", "lambda") for depth in (26, 50)
             for path in seeded_runs(runs, model, [50.0, 60.0], depth=depth)]
    found += [run_comparison.Run(path) for path in seeded_runs(runs, "lambda", [50.0], lambda_position="relative",
                                                              depth=50)]
    groups = run_comparison.group_runs(found)
    assert [(group.label, len(group.runs)) for group in groups] == [
        ("baseline depth=26", 2), ("baseline depth=50", 2), ("lambda depth=26 lambda_position=absolute", 2),
        ("lambda depth=50 lambda_position=absolute", 2), ("lambda depth=50 lambda_position=relative", 1)]
    paired = [(a.label.split()[0] + str(a.settings["depth"]), b.label) for a, b in run_comparison.pairs(groups)]
    assert paired == [("baseline26", "baseline depth=50"), ("baseline26", "lambda depth=26 lambda_position=absolute"),
                      ("baseline50", "lambda depth=50 lambda_position=absolute"),
                      ("baseline50", "lambda depth=50 lambda_position=relative"),
                      ("lambda26", "lambda depth=50 lambda_position=absolute"),
                      ("lambda50", "lambda depth=50 lambda_position=relative")]


def test_time_axis_unit_and_total_time_format():
    assert run_comparison.time_unit(90) == ("s", 1.0) and run_comparison.time_unit(205) == ("min", 60.0)
    assert run_comparison.time_unit(4 * 3600) == ("h", 3600.0)
    assert run_comparison.format_time(4649) == "1 h 17 m 29 s" and run_comparison.format_time(59.6) == "1 m 00 s"


def test_default_is_the_newest_run_of_each_model(tmp_path, capsys):
    runs = tmp_path / "runs"
    old = write_run(runs / "Baseline" / "old", "baseline", [record(1, 10, 1, 1, 1)])
    write_run(runs / "Baseline" / "new", "baseline", [record(1, 20, 1, 1, 1)])
    write_run(runs / "Lambda" / "only", "lambda", [record(1, 30, 1, 1, 1)])
    os.utime(os.path.join(old, "metrics.jsonl"), (1, 1))  # written long ago
    assert compare_runs.main(["--runs-dir", str(runs), "--out", str(tmp_path / "out")]) == 0
    labels = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert labels[1:4] == ["| Baseline/new", "| Lambda/only", "| group"]  # after the header, before the groups


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


def test_a_folder_run_whose_images_are_gone_still_compares(tmp_path, capsys):
    gone = write_run(tmp_path / "runs" / "Lambda" / "f", "lambda", [record(1, 40, 10, 2, 100)], dataset="folder",
                     data_dir=str(tmp_path / "moved"), image_size=64, lambda_position="relative")
    assert compare_runs.main([gone, "--out", str(tmp_path / "out")]) == 0
    assert "| Lambda/f | lambda | ? | 1/5 | 40.00 |" in capsys.readouterr().out  # classes unknown: count unknown


def test_group_curve_is_the_mean_per_epoch_with_a_min_max_or_std_band(tmp_path):
    runs = [run_comparison.Run(path) for path in seeded_runs(tmp_path / "runs", "lambda", [70.0, 74.0, 78.0])]
    runs[2].records.append(record(3, 90.0, 10, 2, 300))  # one run is an epoch further
    (group,) = run_comparison.group_runs(runs)
    minmax, std = run_comparison.curve(group, "test_acc"), run_comparison.curve(group, "test_acc", band="std")
    assert minmax.epochs == [1, 2, 3] and minmax.elapsed_s == [12.0, 34.0, 46.0]
    assert minmax.mean == [10.0, 74.0, 90.0] and minmax.low == [10.0, 70.0, 90.0] and minmax.high == [10.0, 78.0, 90.0]
    assert std.low == pytest.approx([10.0, 70.0, 90.0]) and std.high == pytest.approx([10.0, 78.0, 90.0])  # std 4


@pytest.mark.parametrize("band, low, high, words", [("minmax", 70.0, 78.0, "min-max"),
                                                    ("std", 74.0 - 4.0, 74.0 + 4.0, "mean ± 1 std")])
def test_plot_draws_each_groups_mean_with_a_band_and_names_the_band(tmp_path, band, low, high, words):
    runs = [run_comparison.Run(path) for path in seeded_runs(tmp_path / "runs", "baseline", [60.0, 61.0])
            + seeded_runs(tmp_path / "runs", "lambda", [70.0, 74.0, 78.0])]
    figure = run_comparison.plot(run_comparison.group_runs(runs), str(tmp_path / "c.png"), band)
    assert words in figure.get_suptitle() and (tmp_path / "c.png").is_file()
    accuracy = figure.axes[0]  # accuracy against epoch
    lines = accuracy.get_lines()  # in series order: baseline test, train, lambda test, train
    assert list(lines[2].get_ydata()) == [10.0, 74.0] and list(lines[0].get_ydata()) == [10.0, 60.5]  # means
    bands = [collection.get_paths()[0].vertices[:, 1] for collection in accuracy.collections]
    assert len(bands) == 2  # one per group, test only
    assert (min(bands[1]), max(bands[1])) == pytest.approx((10.0, high))
    assert min(abs(value - low) for value in bands[1]) < 1e-9  # the band's lower edge at epoch 2
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "lambda (3 runs) test" in legend and "baseline (2 runs) train" in legend
