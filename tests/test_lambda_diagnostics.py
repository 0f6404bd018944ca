"""lambda_diagnostics: the content and position shares of each lambda layer's output, the learned
position tables and their figure, in TensorBoard and next to nntest.py's confusion matrix."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

import checkpoints
import lambda_diagnostics as diagnostics
import model_preparation as prep
import nntest
import user_input
from figures import save
from lambda_layer import LambdaLayer

MODES = [("absolute", None), ("relative", None), ("conv", 3)]


class OneLayer(nn.Module):
    def __init__(self, position: str, r: int | None):
        super().__init__()
        self.layer = LambdaLayer(8, heads=2, dim_k=4, size=(4, 4), position=position, r=r)

    def forward(self, x):
        return self.layer(x)


def lambda_model(position: str, **settings) -> nn.Module:
    torch.manual_seed(0)
    return prep.build_model(dict(user_input.defaults(), model="lambda", dataset="synthetic",
                                 lambda_position=position, **settings))


@pytest.mark.parametrize("position, r", MODES)
def test_a_zeroed_embedding_has_position_share_zero(position, r):
    model = OneLayer(position, r)
    with torch.no_grad():
        model.layer.embedding.zero_()
    (content, share), = diagnostics.content_position_shares(model, torch.randn(3, 8, 4, 4)).values()
    assert (content, share) == pytest.approx((1.0, 0.0))


@pytest.mark.parametrize("position, r", MODES)
def test_constant_keys_on_values_of_zero_mean_give_content_share_zero(position, r):
    """Constant keys softmax to 1/m, so lambda_c is the values' mean over positions: 0 for an input
    whose right half is the negated left half (the 1x1 projection and the eval-mode norm, with its
    fresh statistics, are linear and keep that)."""
    model = OneLayer(position, r)
    with torch.no_grad():
        _, _, keys = model.layer.to_qkv.weight.split(model.layer.split_sizes)
        keys.zero_()
    left = torch.randn(3, 8, 4, 2)
    x = torch.cat([left, -left], dim=3)  # b, d, H, W: every channel sums to 0 over the positions
    (content, share), = diagnostics.content_position_shares(model, x).values()
    assert content == pytest.approx(0.0, abs=1e-6) and share == pytest.approx(1.0)


def test_shares_are_measured_in_eval_mode_and_leave_the_model_as_it_was():
    """In training mode the norm would normalise the probe batch by its own statistics and update
    its running statistics; the shares use eval mode, restore training mode and change no buffer."""
    model = lambda_model("relative", depth=26).train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    images = torch.randn(4, 3, 32, 32)
    shares = diagnostics.content_position_shares(model, images)
    assert model.training
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    assert list(shares) == list(diagnostics.lambda_layers(model)) and len(shares) == 8  # ResNet-26: 2 per stage
    assert all(c + p == pytest.approx(1.0) and 0 < c < 1 for c, p in shares.values())
    first = next(iter(diagnostics.lambda_layers(model).values()))
    inputs = []
    first.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    model.eval()
    model(images)
    queries, content_lambda, position_lambdas = first.lambdas(inputs[0])
    content = first.apply_lambdas(queries, content_lambda[:, None], inputs[0]).norm()
    position = first.apply_lambdas(queries, position_lambdas, inputs[0]).norm()
    assert shares["layer1.0.conv2"][0] == pytest.approx((content / (content + position)).item(), rel=1e-5)


def test_position_tables_are_the_last_layer_of_each_stage_as_images():
    relative = diagnostics.position_tables(lambda_model("relative"))
    assert {name: tuple(t.shape) for name, t in relative.items()} == {
        "layer1.2.conv2": (4, 15, 15), "layer2.3.conv2": (4, 7, 7), "layer3.5.conv2": (4, 3, 3),
        "layer4.2.conv2": (4, 1, 1)}
    model = lambda_model("relative")
    layer = diagnostics.lambda_layers(model)["layer1.2.conv2"]
    assert torch.equal(relative["layer1.2.conv2"][1], layer.embedding.detach()[:, :, 1].mean(dim=-1))
    conv = diagnostics.position_tables(lambda_model("conv", lambda_r=5), keys=2)
    assert {tuple(t.shape) for t in conv.values()} == {(2, 5, 5)}
    absolute_model = lambda_model("absolute")
    absolute = diagnostics.position_tables(absolute_model)
    assert [tuple(t.shape) for t in absolute.values()] == [(4, 8, 8), (4, 4, 4), (4, 2, 2), (4, 1, 1)]
    embedding = diagnostics.lambda_layers(absolute_model)["layer1.2.conv2"].embedding.detach()  # n, m, k, u
    assert absolute["layer1.2.conv2"][3, 2, 5] == pytest.approx(embedding[:, 2 * 8 + 5, 3, 0].abs().mean().item())
    assert diagnostics.position_tables(prep.build_model(dict(user_input.defaults(), model="baseline",
                                                             dataset="synthetic"))) == {}


@pytest.mark.parametrize("position", ["absolute", "relative", "conv"])
def test_the_figure_is_drawn_for_every_position_mode(position, tmp_path):
    figure = diagnostics.position_figure(lambda_model(position, depth=26), "epoch 1")
    save(figure, tmp_path / "positions.png")
    image = Image.open(tmp_path / "positions.png")
    assert image.format == "PNG" and image.width > 600 and image.height > 600
    assert len([axes for axes in figure.axes if axes.images]) == 16  # 4 stages x 4 key dimensions


def test_nntest_writes_the_position_tables_next_to_the_confusion_matrix(tmp_path, capsys):
    config = {**user_input.defaults(), "model": "lambda", "depth": 26, "lambda_position": "conv", "lambda_r": 5,
              "dataset": "synthetic", "data_dir": str(tmp_path / "data"), "synthetic_train_size": 10,
              "synthetic_test_size": 8, "batch_size": 8, "num_workers": 0, "device": "cpu", "run_name": "unit"}
    model = prep.build_model(config)
    path = tmp_path / "best.pt"
    checkpoints.save_checkpoint({**dict.fromkeys(checkpoints.CHECKPOINT_KEYS), "model": model.state_dict(),
                                 "config": config, "epoch": 1}, str(path))
    assert nntest.main(["--checkpoint", str(path)]) == 0
    assert f"position tables: {tmp_path / 'best_positions.png'}" in capsys.readouterr().out
    assert Image.open(tmp_path / "best_positions.png").format == "PNG"
    assert (tmp_path / "best_confusion.png").is_file()
