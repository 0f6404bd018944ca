"""The three position modes (absolute, relative, lambda convolution), intra-depth u, mixed precision,
hybrid networks, their settings, and end-to-end runs of a local-context and a hybrid model."""
from __future__ import annotations

import json

import pytest
import torch

import checkpoints
import model_preparation as prep
import user_input
from conftest import SMOKE_FLAGS, refused_settings, run_main
from lambda_layer import LambdaLayer, relative_index
from resnet_lambda import lambda_resnet50
from test_lambda_layer import randomized_layer, reference_lambda

# (position, r, map size): non-square maps, conv contexts smaller than the map and covering it
MODES = [("absolute", None, (3, 4)), ("relative", None, (3, 5)), ("relative", None, (2, 2)), ("relative", None, (1, 3)),
         ("conv", 3, (4, 5)), ("conv", 5, (3, 2)), ("conv", 9, (2, 3))]
MODE_IDS = [f"{p}-r{r}-{h}x{w}" if r else f"{p}-{h}x{w}" for p, r, (h, w) in MODES]


def mode_layer(position, r, size, **kwargs) -> LambdaLayer:
    return randomized_layer(size=size, position=position, r=r, **kwargs)


@pytest.mark.parametrize("position, r, size", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dim_u", [1, 3])
@pytest.mark.parametrize("training", [False, True])
def test_every_mode_matches_float64_loop_reference(position, r, size, dim_u, training):
    layer = mode_layer(position, r, size, dim_u=dim_u).train(training)
    x = torch.randn(2, 6, *size)
    expected = reference_lambda(layer, x, training)
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (2, 8, *size)
    # float32 against float64: sums of at most a few hundred terms of order one
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("position, r, size", MODES, ids=MODE_IDS)
def test_float64_every_mode_matches_reference_tightly(position, r, size):
    layer = mode_layer(position, r, size, dim_u=2).double().eval()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, reference_lambda(layer, x, training=False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("position", ["absolute", "relative"])
def test_heads_wider_and_narrower_than_keys_match_the_reference(position):
    """h 1, k 4, v 8 (h k < v) and h 2, k 3, v 4 (h k > v) on a 3x4 map, u 2 (the former einsum-order cases)."""
    for dim_out, heads, dim_k in ((8, 1, 4), (8, 2, 3)):
        layer = randomized_layer(dim_out=dim_out, heads=heads, dim_k=dim_k, dim_u=2, position=position).double().eval()
        x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_lambda(layer, x, False), rtol=1e-10, atol=1e-10)


def shifted_pattern_outputs(layer: LambdaLayer, size, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs for a 3x3 pattern at (1, 1) and at (1 + dy, 1 + dx) of an otherwise zero map."""
    torch.manual_seed(3)
    pattern = torch.randn(2, layer.dim, 3, 3)
    maps = torch.zeros(2, 2, layer.dim, *size)
    maps[0, :, :, 1:4, 1:4] = pattern
    maps[1, :, :, 1 + shift[0]:4 + shift[0], 1 + shift[1]:4 + shift[1]] = pattern
    with torch.no_grad():
        return layer(maps[0]), layer(maps[1])


def equivariance_layer(position, r, size) -> LambdaLayer:
    """Eval mode with values' BatchNorm mapping 0 to 0, so the zeros around the pattern carry no values."""
    layer = randomized_layer(dim=4, dim_out=4, size=size, position=position, r=r, dim_u=2).eval()
    values = slice(layer.heads * layer.dim_k, None)  # norm_qv's channels after the queries'
    layer.norm_qv.running_mean[values] = 0
    layer.norm_qv.bias.data[values] = 0
    return layer


@pytest.mark.parametrize("position, r", [("relative", None), ("conv", 5)])
def test_translation_equivariance(position, r):
    """Shifting a pattern inside a larger map shifts the output (compared where both positions exist)."""
    size, (dy, dx) = (9, 10), (2, 3)
    out, shifted = shifted_pattern_outputs(equivariance_layer(position, r, size), size, (dy, dx))
    assert out.abs().max() > 0.1
    torch.testing.assert_close(shifted[..., dy:, dx:], out[..., :size[0] - dy, :size[1] - dx], rtol=1e-5, atol=1e-5)


def test_absolute_embeddings_are_not_translation_equivariant():
    """The check above can fail: with absolute embeddings the shifted output differs."""
    size, (dy, dx) = (9, 10), (2, 3)
    out, shifted = shifted_pattern_outputs(equivariance_layer("absolute", None, size), size, (dy, dx))
    assert not torch.allclose(shifted[..., dy:, dx:], out[..., :size[0] - dy, :size[1] - dx], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("size", [(4, 4), (3, 5), (5, 2)])
def test_conv_covering_the_map_equals_relative(size):
    """r = 2 max(H, W) - 1 makes the lambda convolution a global relative context.

    Mapping, with c = r // 2: conv kernel[k, u, 0, i, j] == relative table[i - c + H - 1, j - c + W - 1, k, u]
    (both weigh the context at offset (i - c, j - c) from the query); kernel entries for offsets
    beyond the map never meet a context position and are zero.
    """
    height, width = size
    r = 2 * max(size) - 1
    centre = r // 2
    relative = randomized_layer(size=size, position="relative", dim_u=2).eval()
    conv = randomized_layer(size=size, position="conv", r=r, dim_u=2).eval()
    conv.load_state_dict({k: v for k, v in relative.state_dict().items() if k != "embedding"}, strict=False)
    with torch.no_grad():
        conv.embedding.zero_()
        table = relative.embedding.permute(2, 3, 0, 1)  # k, u, 2H-1, 2W-1
        conv.embedding[:, :, 0, centre - height + 1:centre + height, centre - width + 1:centre + width] = table
        x = torch.randn(3, 6, *size)
        torch.testing.assert_close(conv(x), relative(x), rtol=1e-5, atol=1e-5)
        conv.embedding.normal_()  # not vacuous: other weights give another function
        assert not torch.allclose(conv(x), relative(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("size, r, dim_u", [((4, 4), 7, 1), ((3, 5), 11, 3), ((2, 2), 23, 2), ((1, 1), 3, 1)])
def test_conv_on_a_map_its_kernel_covers_takes_the_fast_path_and_equals_the_3d_convolution(size, r, dim_u, monkeypatch):
    """Made for a map its kernel covers, the lambda convolution is computed as a global context with
    the kernel as its table (no conv3d): forward and gradients equal the 3D convolution's, float64."""
    import lambda_layer

    fast = randomized_layer(size=size, position="conv", r=r, dim_u=dim_u).double().train()
    plain = randomized_layer(position="conv", r=r, dim_u=dim_u).double().train()  # no size: the 3D convolution
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(3, 6, *size, dtype=torch.float64, requires_grad=True)
    out_plain = plain(x)
    grad = torch.randn_like(out_plain)
    grads_plain = torch.autograd.grad(out_plain, [x, *plain.parameters()], grad)
    monkeypatch.setattr(lambda_layer.F, "conv3d", None)  # the fast path must not need it
    out_fast = fast(x)
    grads_fast = torch.autograd.grad(out_fast, [x, *fast.parameters()], grad)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-10, atol=1e-10)
    for got, expected in zip(grads_fast, grads_plain):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("position, r, size", MODES, ids=MODE_IDS)
def test_gradients_reach_every_parameter(position, r, size):
    layer = mode_layer(position, r, size, dim_u=2).train()
    out = layer(torch.randn(3, 6, *size))
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    missing = [name for name, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("size", [(1, 1), (2, 7), (7, 3), (6, 6), (11, 4)])
def test_conv_accepts_any_map_size(size):
    """One conv layer runs on every H x W, square or not, and its output matches the loop reference."""
    layer = mode_layer("conv", 3, None, dim_u=2).double().eval()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (2, 8, *size) and torch.isfinite(got).all()
    torch.testing.assert_close(got, reference_lambda(layer, x, training=False), rtol=1e-10, atol=1e-10)


def test_relative_index_is_a_non_persistent_buffer_and_tables_are_shared():
    layer = LambdaLayer(8, heads=2, dim_k=4, size=(3, 5), position="relative")
    assert "relative_index" in dict(layer.named_buffers())
    assert "relative_index" not in layer.state_dict()
    assert layer.embedding.shape == (5, 9, 4, 1)
    index = relative_index((3, 5))
    assert index.shape == (15, 15) and index.min() == 0 and index.max() == 5 * 9 - 1
    assert (index.diagonal() == 2 * 9 + 4).all()  # offset (0, 0) sits at the table's centre
    other = LambdaLayer(8, heads=2, dim_k=4, size=(3, 5), position="relative", embedding=layer.embedding)
    assert other.embedding is layer.embedding


@pytest.mark.parametrize("kwargs, message", [
    ({"position": "conv", "r": 4}, "odd"),
    ({"position": "conv"}, "odd"),
    ({"position": "relative", "size": 4, "r": 3}, "global context"),
    ({"position": "axial", "size": 4}, "not one of"),
    ({"position": "relative"}, r"size=\(H, W\) is required"),
])
def test_bad_layer_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LambdaLayer(8, heads=2, dim_k=4, **kwargs)


# --- mixed precision ---

@pytest.mark.parametrize("position, r, size", MODES, ids=MODE_IDS)
def test_bfloat16_autocast_matches_float32(position, r, size):
    """Under CPU autocast (bf16 projections, fp32 lambdas) the output stays within 2 % of float32
    (relative L2 error; bf16 keeps 8 significant bits) and keeps the input's dtype."""
    layer = mode_layer(position, r, size, dim=16, dim_out=16, heads=4, dim_k=4, dim_u=2).eval()
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
            half_input = layer(x.bfloat16())
    assert got.dtype == torch.float32 and half_input.dtype == torch.bfloat16
    assert torch.isfinite(got).all() and torch.isfinite(half_input).all()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("position, r, size", MODES, ids=MODE_IDS)
def test_float16_autocast_lambdas_do_not_overflow(position, r, size):
    """Position lambdas beyond float16's range (65504) stay finite: the contractions run in float32."""
    layer = mode_layer(position, r, size, dim=16, dim_out=16, heads=4, dim_k=4, dim_u=2).eval()
    with torch.no_grad():
        layer.embedding.mul_(1e5)
        x = torch.randn(2, 16, *size)
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.float16):
            got = layer(x)
    assert expected.abs().max() > 65504
    assert torch.isfinite(got).all()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


# --- networks ---

def lambda_layers(model) -> list[LambdaLayer]:
    return [m for m in model.modules() if isinstance(m, LambdaLayer)]


@pytest.mark.parametrize("stages, count", [("CCLL", 9), ("CCCL", 3), ("LCLC", 9)])
def test_hybrid_stages(stages, count):
    model = lambda_resnet50(num_classes=10, stages=stages)
    assert len(lambda_layers(model)) == count
    for letter, stage in zip(stages, (model.layer1, model.layer2, model.layer3, model.layer4)):
        mixers = [block.conv2 for block in stage]
        if letter == "C":  # the baseline's 3x3 convs, stride in the 3x3
            assert all(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in mixers)
        else:
            assert not any(isinstance(m, torch.nn.Conv2d) for m in mixers)


def test_conv_layers_own_their_kernels_and_relative_tables_are_shared_per_stage_and_size():
    conv = lambda_layers(lambda_resnet50(num_classes=10, position="conv", r=7, dim_u=2))
    assert len({id(layer.embedding) for layer in conv}) == 16
    assert all(layer.embedding.shape == (16, 2, 1, 7, 7) for layer in conv)
    relative = lambda_layers(lambda_resnet50(num_classes=10, position="relative"))
    tables = {id(layer.embedding): tuple(layer.embedding.shape[:2]) for layer in relative}
    assert sorted(tables.values()) == [(1, 1), (3, 3), (3, 3), (7, 7), (7, 7), (15, 15), (15, 15)]


@pytest.mark.parametrize("position", ["relative", "conv"])
def test_cifar_stem_local_and_relative_models_train(position):
    """CIFAR stem (no downsampling in the stem), 12x12 images to stay fast (maps 12, 6, 3, 2 in c2-c5,
    non-square 12x10 to boot): every parameter learns."""
    torch.manual_seed(0)
    model = lambda_resnet50(num_classes=10, stem="cifar", image_size=(12, 10), zero_init_residual=False,
                            position=position, dim_u=2)
    logits = model(torch.randn(2, 3, 12, 10))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.arange(2)).backward()
    assert [name for name, p in model.named_parameters() if not p.grad.abs().sum() > 0] == []


def test_absolute_embeddings_too_large_are_refused():
    with pytest.raises(ValueError, match="16,777,216 entries.*'relative' or 'conv'"):
        lambda_resnet50(num_classes=10, stem="cifar")
    assert len(lambda_layers(lambda_resnet50(num_classes=10, stem="cifar", stages="CCLL"))) == 9


BAD_LAMBDA_ARGUMENTS = [
    (["--stem", "cifar"], "LAMBDA_POSITION=absolute with STEM=cifar"),
    (["--lambda-position", "axial"], "LAMBDA_POSITION='axial' is not one of absolute, relative, conv"),
    (["--lambda-r", "4"], "LAMBDA_R=4 must be odd"),
    (["--lambda-r", "0"], "LAMBDA_R=0 must be >= 1"),
    (["--lambda-u", "0"], "LAMBDA_U=0 must be >= 1"),
    (["--lambda-stages", "CLL"], "LAMBDA_STAGES='CLL' must be 4 letters"),
    (["--lambda-stages", "CCCC"], "use MODEL=baseline"),
]


@pytest.mark.parametrize("argv, expected", BAD_LAMBDA_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_LAMBDA_ARGUMENTS])
def test_bad_lambda_settings_exit_2_with_one_line(argv, expected, capsys):
    err = refused_settings(argv, capsys)
    assert expected in err
    if argv == ["--stem", "cifar"]:
        assert "--lambda-position relative or conv" in err


def test_lambda_settings_accepted_and_built():
    for argv in (["--stem", "cifar", "--lambda-position", "conv"], ["--stem", "cifar", "--lambda-stages", "CCLL"],
                 ["--model", "baseline", "--stem", "cifar"]):
        user_input.parse_config(argv)
    config = user_input.parse_config(["--lambda-position", "conv", "--lambda-r", "5", "--lambda-u", "2",
                                      "--lambda-stages", "CCCL"])
    layers = lambda_layers(prep.build_model(config))
    assert len(layers) == 3 and all(l.position == "conv" and l.r == 5 and l.dim_u == 2 for l in layers)


@pytest.mark.parametrize("flag, value", [("--lambda-position", "relative"), ("--lambda-r", "7"),
                                         ("--lambda-u", "2"), ("--lambda-stages", "CCLL")])
def test_resume_with_other_lambda_structure_is_refused(tmp_path, flag, value):
    saved = user_input.parse_config(["--lambda-position", "conv"])
    path = tmp_path / "last.pt"
    torch.save({**dict.fromkeys(checkpoints.CHECKPOINT_KEYS), "config": saved}, path)  # only the config is read
    config = user_input.parse_config(["--lambda-position", "conv", flag, value, "--resume", str(path)])
    key = flag[2:].replace("-", "_")
    with pytest.raises(user_input.ConfigError, match=f"{key.upper()}={saved[key]!r}"):
        checkpoints.resolve_resume(config)
    assert checkpoints.resolve_resume({**config, key: saved[key]})["path"] == str(path)


def test_parameter_table_command(tmp_path):
    """`python model_preparation.py [flags]` prints the baseline and each lambda variant's count."""
    import subprocess
    import sys
    from conftest import ROOT

    result = subprocess.run([sys.executable, f"{ROOT}/model_preparation.py", "--stem", "cifar",
                             "--lambda-position", "conv", "--lambda-r", "5"],
                            capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| lambda") or line.startswith("| baseline")]
    assert len(rows) == 1 + 3 * 3
    assert "| lambda | absolute | LLLL | refused:" in result.stdout
    config = user_input.parse_config(["--stem", "cifar", "--lambda-position", "relative", "--lambda-stages", "CCLL"])
    assert f"| lambda | relative | CCLL | {prep.count_parameters(prep.build_model(config)):,} |" in result.stdout
    assert f"| baseline | - | CCCC | {prep.count_parameters(prep.build_model({**config, 'model': 'baseline'})):,} |" \
        in result.stdout


# --- end to end ---

# r 7 rather than 23 in the conv run: PyTorch's CPU backward of a 23x23 convolution takes seconds per layer
@pytest.mark.parametrize("flags", [["--lambda-position", "conv", "--stem", "cifar", "--lambda-r", "7"],
                                   ["--lambda-stages", "CCLL"]], ids=["conv-cifar-stem", "hybrid-CCLL"])
def test_smoke_run(tmp_path, flags):
    args = [*SMOKE_FLAGS, "--max-batches", "1", "--batch-size", "4", "--data-dir", "data", "--epochs", "1", "--run-name", "smoke", *flags]
    result = run_main(args, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "Lambda" / "smoke"
    config = json.loads((run_dir / "config.json").read_text())
    for flag, value in zip(flags[::2], flags[1::2]):
        assert str(config[flag[2:].replace("-", "_")]) == value
    assert f"{prep.count_parameters(prep.build_model(config)):,} parameters" in result.stdout
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["train_loss"] > 0 and record["test_loss"] > 0


# --- kernels, compilation, checkpoints ---

# kernel-launching aten ops (benchmarks/measuring.py's KernelCount) of one forward + backward: exact regression guards,
# not goals (issue 21 drops issue 12's kernel budgets: a graphed step makes launches cheap)
KERNELS = {("absolute", None, 8, 1): 26, ("relative", None, 8, 1): 29, ("relative", None, 2, 1): 29,
           ("conv", 23, 8, 1): 29, ("conv", 23, 2, 1): 29, ("conv", 7, 8, 1): 22,
           ("absolute", None, 8, 3): 29, ("relative", None, 8, 3): 32, ("relative", None, 2, 3): 32,
           ("conv", 23, 8, 3): 32, ("conv", 23, 2, 3): 32}


@pytest.mark.parametrize("position, r, size, u", list(KERNELS),
                         ids=[f"{p}-r{r}-{s}x{s}-u{u}" for p, r, s, u in KERNELS])
def test_kernel_count_per_layer(position, r, size, u):
    from benchmarks.measuring import count_kernels
    from benchmarks.mixers import mixer_step

    torch.manual_seed(0)
    layer = LambdaLayer(16, heads=4, dim_k=4, dim_u=u, size=size, position=position, r=r).train()
    x = torch.randn(2, 16, size, size, requires_grad=True)
    count = count_kernels(mixer_step(layer, x, torch.randn_like(layer(x))))
    assert count == KERNELS[(position, r, size, u)]


def test_kernel_count_per_step():
    """Counted as benchmark.py counts it (ResNet-50, fp32, batch 2): an exact regression guard."""
    from benchmarks.mixers import step_kernels
    from benchmarks.models import model_config, model_variants
    from benchmarks.suite import build_parser, resolve_args

    args = build_parser().parse_args(["--device", "cpu", "--batch-size", "2"])
    resolve_args(args)
    counts = {}
    for variant in model_variants(args):
        torch.manual_seed(0)
        model = prep.build_model(model_config(variant, args))
        counts[variant.get("lambda_position", "baseline")] = step_kernels(model, args, torch.device("cpu"))
    assert counts == {"baseline": 408, "absolute": 796, "relative": 838, "conv": 845}


@pytest.mark.parametrize("position, r, size", [("absolute", None, (3, 4)), ("relative", None, (3, 5)),
                                               ("conv", 5, (4, 3)), ("conv", 7, (3, 4))],
                         ids=["absolute", "relative", "conv-3d", "conv-covering"])
def test_layer_compiles_without_graph_breaks(position, r, size):
    """torch.compile(fullgraph=True) traces forward and backward whole (AOT autograd, no code generation:
    fast) and gives the eager outputs and gradients in every mode."""
    layer = mode_layer(position, r, size, dim_u=2).train()
    x = torch.randn(2, 6, *size)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    grads = []
    for run in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        out = run(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([out.detach()] + [p.grad.clone() for p in layer.parameters()])
    for eager, traced in zip(*grads):
        torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-5)


def earlier_layout_state_dict(position: str, size, r=None, dim_u=2) -> dict:
    """A state_dict as the layer of 6a669d7 saved it (same keys and shapes, its strides): the 1x1 kernel
    channels-last, the absolute E laid out (n, k, m, u), the relative table (u, 2H-1, 2W-1, k), the
    conv kernel (u, 1, r, r, k), and the norm's batch counter at 0."""
    torch.manual_seed(5)
    state = {"to_qkv.weight": torch.randn(4 + 8 + 4, 6, 1, 1).contiguous(memory_format=torch.channels_last)}
    channels = 4 + 8  # h k + u v with h 2, k 2, v 4
    state.update({"norm_qv.weight": torch.rand(channels) + 0.5, "norm_qv.bias": torch.randn(channels),
                  "norm_qv.running_mean": torch.randn(channels), "norm_qv.running_var": torch.rand(channels) + 0.5,
                  "norm_qv.num_batches_tracked": torch.tensor(0)})
    n = size[0] * size[1]
    if position == "absolute":
        state["embedding"] = torch.randn(n, 2, n, dim_u).permute(0, 2, 1, 3)  # n, m, k, u
    elif position == "relative":
        state["embedding"] = torch.randn(dim_u, 2 * size[0] - 1, 2 * size[1] - 1, 2).permute(1, 2, 3, 0)
    else:
        state["embedding"] = torch.randn(dim_u, 1, r, r, 2).permute(4, 0, 1, 2, 3)  # k, u, 1, r, r
    return state


@pytest.mark.parametrize("position, r, size", [("absolute", None, (3, 4)), ("relative", None, (3, 5)),
                                               ("conv", 5, (4, 3)), ("conv", 7, (3, 4))],
                         ids=["absolute", "relative", "conv-3d", "conv-covering"])
def test_checkpoints_of_the_earlier_layer_load(position, r, size):
    """Keys and logical shapes are those of every earlier checkpoint (one fused to_qkv, one norm_qv, E
    indexed (n, m, k, u), (2H-1, 2W-1, k, u) or (k, u, 1, r, r)); their strides do not matter: a
    state_dict laid out as the layer of 6a669d7 laid it out loads strictly and the layer computes
    the float64 loop reference with those weights."""
    state = earlier_layout_state_dict(position, size, r)
    layer = LambdaLayer(6, 8, heads=2, dim_k=2, dim_u=2, size=size, position=position, r=r)
    assert sorted(layer.state_dict()) == sorted(state)
    layer.load_state_dict(state)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    layer = layer.double().eval()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_lambda(layer, x, training=False), rtol=1e-10, atol=1e-10)
