"""Evaluation with a confusion matrix, its TensorBoard logging, and `python nntest.py --checkpoint`."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.data import DataLoader, TensorDataset

import checkpoints
import data_preprocessing
import model_preparation as prep
import nntest
import user_input
from conftest import ROOT
from figures import ANNOTATED_CLASSES, confusion_figure, save
from log_data import RunLogger, per_class_accuracy


def test_confusion_matches_a_loop_reference():
    """The model is the identity, so the 'images' are the logits; counts checked one image at a time."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    loader = DataLoader(TensorDataset(logits, labels), batch_size=7)
    criterion = nn.CrossEntropyLoss()
    for max_batches, count in ((0, 50), (3, 21)):
        loss, accuracy, confusion = nntest.evaluate_confusion(nn.Identity(), loader, criterion,
                                                             torch.device("cpu"), max_batches)
        reference = torch.zeros(4, 4, dtype=torch.long)
        for i in range(count):
            reference[labels[i], logits[i].argmax()] += 1
        assert torch.equal(confusion, reference)
        assert accuracy == pytest.approx(100.0 * reference.trace().item() / count)
        assert loss == pytest.approx(criterion(logits[:count], labels[:count]).item(), rel=1e-5)


def test_per_class_accuracy_is_the_share_of_each_row_on_the_diagonal():
    accuracies = per_class_accuracy(torch.tensor([[3, 1, 0], [2, 2, 4], [0, 0, 0]]))
    assert accuracies[:2] == pytest.approx([75.0, 25.0])
    assert math.isnan(accuracies[2])  # no image of that class


def test_confusion_figure_shades_cells_by_their_share_of_the_row_and_shows_counts(tmp_path):
    names = ["cat", "dog", "ship"]
    figure = confusion_figure(torch.tensor([[5, 0, 0], [1, 1, 0], [0, 0, 0]]), names, "a title")
    axes = figure.axes[0]
    shares = np.asarray(axes.images[0].get_array())
    assert shares.tolist() == [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
    assert [text.get_text() for text in axes.texts] == ["5", "1", "1"]  # empty cells stay blank
    assert [label.get_text() for label in axes.get_xticklabels()] == names
    assert [label.get_text() for label in axes.get_yticklabels()] == ["cat (100.0)", "dog (50.0)", "ship (-)"]
    assert axes.get_title() == "a title" and "predicted" in axes.get_xlabel()
    save(figure, str(tmp_path / "confusion.png"))
    with Image.open(tmp_path / "confusion.png") as image:
        assert image.format == "PNG" and 400 < image.size[1] < image.size[0] < 2000


def test_confusion_figure_of_100_classes_has_no_cell_numbers_or_class_names(tmp_path):
    counts = torch.eye(100, dtype=torch.long) * 7 + 1
    figure = confusion_figure(counts, [f"class {i}" for i in range(100)])
    axes = figure.axes[0]
    assert ANNOTATED_CLASSES < 100 and len(axes.texts) == 0
    assert np.asarray(axes.images[0].get_array()).shape == (100, 100)
    save(figure, str(tmp_path / "confusion.png"))
    labels = [label.get_text() for label in axes.get_xticklabels() + axes.get_yticklabels()]
    assert 4 <= len(labels) <= 30 and not any("class" in label for label in labels)  # index ticks only
    with Image.open(tmp_path / "confusion.png") as image:
        assert 400 < image.size[1] < image.size[0] < 2000


def test_logger_writes_per_class_accuracy_confusion_image_and_hparams(tmp_path):
    names = ["cat", "dog", "ship"]
    confusions = [torch.tensor([[2, 1, 0], [0, 3, 0], [0, 0, 0]]), torch.tensor([[3, 0, 0], [1, 2, 0], [0, 0, 1]])]
    logger = RunLogger(str(tmp_path))
    logger.config({**user_input.defaults(), "model": "baseline"})
    for epoch, confusion in enumerate(confusions, start=1):
        logger.epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 40.0 + epoch, "test_loss": 2.0 / epoch,
                      "test_acc": [60.0, 55.0][epoch - 1], "lr": 1e-3, "epoch_time_s": 1.0,
                      "train_img_per_s": 10.0, "test_time_s": 0.5}, 2)
        logger.evaluation(epoch, confusion, names)
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["Accuracy_per_class/cat"] == [(1, pytest.approx(200 / 3)), (2, 100.0)]
    assert scalars["Accuracy_per_class/dog"] == [(1, 100.0), (2, pytest.approx(200 / 3))]
    assert scalars["Accuracy_per_class/ship"] == [(2, 100.0)]  # absent from the first evaluation
    images = events.Images("Confusion/test")
    assert [image.step for image in images] == [1, 2]
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and 400 < images[0].height < images[0].width
    assert scalars["HParams/best_test_acc"] == [(2, 60.0)] and scalars["HParams/final_test_acc"] == [(2, 55.0)]
    plugin = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert plugin.session_start_info.hparams["model"].string_value == "baseline"
    assert plugin.session_start_info.hparams["epochs"].number_value == user_input.EPOCHS
    assert plugin.session_start_info.hparams["adam_betas"].string_value == "(0.9, 0.9999)"


def test_logger_draws_the_confusion_image_at_the_first_every_tenth_and_last_epoch(tmp_path):
    logger = RunLogger(str(tmp_path))
    confusion = torch.tensor([[2, 1], [0, 3]])
    for epoch in range(1, 13):
        logger.epoch({"epoch": epoch, "train_loss": 1.0, "train_acc": 50.0, "test_loss": 1.0, "test_acc": 50.0,
                      "lr": 1e-3, "epoch_time_s": 1.0, "train_img_per_s": 10.0, "test_time_s": 0.5}, 12)
        logger.evaluation(epoch, confusion, ["cat", "dog"])
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [image.step for image in events.Images("Confusion/test")] == [1, 10, 12]
    assert [e.step for e in events.Scalars("Accuracy_per_class/cat")] == list(range(1, 13))


# --- the command line ---

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of an untrained baseline with the CIFAR stem (not the default, so the CLI must read
    the stored settings), on a synthetic set of 20 test images; and that model, for reference."""
    folder = tmp_path_factory.mktemp("nntest")
    config = {**user_input.defaults(), "model": "baseline", "stem": "cifar", "dataset": "synthetic",
              "data_dir": str(folder / "data"), "synthetic_train_size": 10, "synthetic_test_size": 20,
              "batch_size": 8, "num_workers": 0, "device": "cpu", "run_name": "unit"}
    torch.manual_seed(0)
    model = prep.build_model(config)
    path = folder / "best.pt"
    state = {**dict.fromkeys(checkpoints.CHECKPOINT_KEYS), "model": model.state_dict(), "config": config, "epoch": 7}
    checkpoints.save_checkpoint(state, str(path))
    return path, config, model


def test_cli_evaluates_the_checkpoint_with_its_stored_settings(checkpoint, tmp_path, capsys):
    path, config, model = checkpoint
    assert nntest.main(["--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    _, test_set = data_preprocessing.build_datasets(config)
    loss, accuracy, confusion = nntest.evaluate_confusion(model, DataLoader(test_set, batch_size=8),
                                                         prep.build_criterion(config), torch.device("cpu"))
    assert "baseline ResNet-50 of run 'unit', after epoch 7; 20 test images (synthetic)" in printed
    assert f"top-1 accuracy {accuracy:.2f}%  test loss {loss:.4f}" in printed
    for name, class_accuracy in zip(test_set.classes, per_class_accuracy(confusion)):
        assert f"  {name:<14}  {class_accuracy:6.2f}%  of 2\n" in printed
    png = tmp_path / "out" / "best_confusion.png"
    assert f"confusion matrix: {png}" in printed
    assert Image.open(png).format == "PNG"


def test_cli_data_flags_override_the_checkpoint_and_out_defaults_to_its_folder(checkpoint, capsys):
    path, _, _ = checkpoint
    assert nntest.main(["--checkpoint", str(path), "--batch-size", "4", "--max-batches", "1"]) == 0
    assert "; 4 test images (synthetic)" in capsys.readouterr().out
    assert (path.parent / "best_confusion.png").is_file()


def test_cli_bad_input_is_one_line_with_exit_2(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    (tmp_path / "corrupt.pt").write_bytes(path.read_bytes()[:1000])
    torch.save({"weights": 1}, tmp_path / "other.pt")
    (tmp_path / "file").write_text("x")
    state = torch.load(path, weights_only=False)
    torch.save({**state, "config": {**state["config"], "stem": "imagenet"}}, tmp_path / "mismatch.pt")
    cases = [(["--checkpoint", str(tmp_path / "mismatch.pt")], "the stored weights do not fit the stored settings"),
             (["--checkpoint", str(tmp_path / "missing.pt")], "missing.pt does not exist"),
             (["--checkpoint", str(tmp_path / "corrupt.pt")], "corrupt.pt cannot be read"),
             (["--checkpoint", str(tmp_path / "other.pt")], "other.pt is not a checkpoint of main_general.py"),
             (["--checkpoint", str(path), "--batch-size", "0"], "BATCH_SIZE=0 must be >= 1"),
             (["--checkpoint", str(path), "--dataset", "imagenet"], "DATASET='imagenet'"),
             (["--checkpoint", str(path), "--out", str(tmp_path / "file")], "choose another --out")]
    for argv, expected in cases:
        assert nntest.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("nntest.py: error: ") and expected in err, err
    for argv, expected in (([], "--checkpoint"), (["--checkpoint", str(path), "--epochs", "3"], "unrecognized")):
        with pytest.raises(SystemExit) as exit_info:
            nntest.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err


def test_cli_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "nntest.py"), "--checkpoint", "corrupt.pt"],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("nntest.py: error: checkpoint corrupt.pt cannot be read")
