"""The lambda layer against a float64 reference written with explicit loops over positions."""
from __future__ import annotations


import pytest
import torch

from lambda_layer import LambdaLayer, make_position_embedding


def _batch_norm(x: torch.Tensor, norm: torch.nn.BatchNorm2d, training: bool) -> torch.Tensor:
    """BatchNorm of x [B, C, n] computed by hand; batch statistics in training, running ones in eval."""
    if training:
        mean = x.mean(dim=(0, 2))
        var = x.var(dim=(0, 2), unbiased=False)
    else:
        mean, var = norm.running_mean.double(), norm.running_var.double()
    scale = norm.weight.double() / torch.sqrt(var + norm.eps)
    return (x - mean[None, :, None]) * scale[None, :, None] + norm.bias.double()[None, :, None]


def embedding_at(layer: LambdaLayer, n: int, m: int, width: int) -> torch.Tensor:
    """E[n, m] of shape [k, u] in float64, read from the layer's parameter by index arithmetic.

    absolute: E[n, m]. relative: R[dy + H - 1, dx + W - 1] for the offset (dy, dx) = m - n of the
    context position from the query. conv: kernel[:, :, 0, dy + r // 2, dx + r // 2] inside the
    r x r context, zero outside it (the context ends there).
    """
    embedding = layer.embedding.double()
    if layer.position == "absolute":
        return embedding[n, m]
    (query_y, query_x), (context_y, context_x) = divmod(n, width), divmod(m, width)
    dy, dx = context_y - query_y, context_x - query_x
    if layer.position == "relative":
        return embedding[dy + layer.size[0] - 1, dx + width - 1]
    centre = layer.r // 2
    if abs(dy) > centre or abs(dx) > centre:
        return torch.zeros(layer.dim_k, layer.dim_u, dtype=torch.float64)
    return embedding[:, :, 0, dy + centre, dx + centre]


def reference_lambda(layer: LambdaLayer, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Bello 2021, eq. for the multi-query lambda layer, in float64 loops, for every position mode.

    y[b, h, v, n] = sum_k q[b, h, k, n] * (lambda_c[b, k, v] + lambda_p[b, n, k, v]),
    lambda_c[b, k, v] = sum_u sum_m softmax_m(K)[b, u, k, m] V[b, u, v, m],
    lambda_p[b, n, k, v] = sum_u sum_m E[n, m, k, u] V[b, u, v, m], E[n, m] from ``embedding_at``.
    """
    x = x.double()
    batch, dim, height, width = x.shape
    n_positions = height * width
    h, k, u, v = layer.heads, layer.dim_k, layer.dim_u, layer.dim_v
    pixels = x.reshape(batch, dim, n_positions)  # [B, d, n]: channels stay channels

    def project(weight):  # 1x1 conv, no bias: [B, d, n] -> [B, out, n]
        return torch.einsum("od,bdn->bon", weight, pixels)

    # to_qkv's output channels: queries (h, k), values (u, v), keys (u, k); norm_qv normalises the first two
    weight_q, weight_v, weight_k = layer.to_qkv.weight.double()[:, :, 0, 0].split(layer.split_sizes)
    normalised = _batch_norm(torch.cat([project(weight_q), project(weight_v)], dim=1), layer.norm_qv, training)
    queries = normalised[:, :h * k].reshape(batch, h, k, n_positions)
    keys = project(weight_k).reshape(batch, u, k, n_positions)
    values = normalised[:, h * k:].reshape(batch, u, v, n_positions)

    out = torch.zeros(batch, h, v, n_positions, dtype=torch.float64)
    for b in range(batch):
        # softmax over context positions, one loop over m for the normaliser
        normaliser = torch.zeros(u, k, dtype=torch.float64)
        for m in range(n_positions):
            normaliser += torch.exp(keys[b, :, :, m])
        content = torch.zeros(k, v, dtype=torch.float64)
        for m in range(n_positions):
            key = torch.exp(keys[b, :, :, m]) / normaliser  # [u, k]
            content += key.T @ values[b, :, :, m]  # [k, u] @ [u, v]
        for n in range(n_positions):  # queries
            position = torch.zeros(k, v, dtype=torch.float64)
            for m in range(n_positions):  # context positions
                position += embedding_at(layer, n, m, width) @ values[b, :, :, m]  # [k, u] @ [u, v]
            out[b, :, :, n] = queries[b, :, :, n] @ (content + position)  # [h, k] @ [k, v]
    return out.reshape(batch, h * v, height, width)


def randomized_layer(dim=6, dim_out=8, heads=2, dim_k=3, dim_u=1, size=(3, 4), seed=0, **mode) -> LambdaLayer:
    """A layer whose BatchNorms have random affine parameters and running statistics.

    ``mode``: position= and r= of the layer (default: absolute embeddings for ``size``).
    """
    torch.manual_seed(seed)
    layer = LambdaLayer(dim, dim_out, heads=heads, dim_k=dim_k, dim_u=dim_u, size=size, **mode)
    norm = layer.norm_qv  # queries' and values' channels
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.normal_()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("dim_u", [1, 3])
@pytest.mark.parametrize("training", [False, True])
def test_layer_matches_float64_loop_reference(dim_u, training):
    layer = randomized_layer(dim_u=dim_u).train(training)
    x = torch.randn(2, 6, 3, 4)
    expected = reference_lambda(layer, x, training)
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (2, 8, 3, 4)
    # float32 against float64: sums of at most a few hundred terms of order one
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_float64_layer_matches_reference_tightly():
    layer = randomized_layer(dim_u=2).double().eval()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, reference_lambda(layer, x, training=False), rtol=1e-10, atol=1e-10)


def test_pixel_permutation_moves_outputs_with_the_pixels():
    """Permuting pixels (and the embedding's rows and columns with them) permutes the output.

    The reproduction reshaped [B, C, H, W] straight to [B, H*W, C], mixing channels into positions;
    such a layer fails this test, because a pixel permutation then scrambles channels too.
    """
    layer = randomized_layer(dim=8, dim_out=8, size=(4, 4)).eval()
    x = torch.randn(2, 8, 4, 4)
    n = 16
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    permuted_x = x.reshape(2, 8, n)[:, :, permutation].reshape(2, 8, 4, 4)  # pixel i <- pixel perm[i]
    permuted = randomized_layer(dim=8, dim_out=8, size=(4, 4)).eval()
    permuted.load_state_dict(layer.state_dict())
    with torch.no_grad():
        permuted.embedding.copy_(layer.embedding[permutation][:, permutation])  # E'[i, j] = E[perm i, perm j]
        expected = layer(x).reshape(2, 8, n)[:, :, permutation].reshape(2, 8, 4, 4)
        got = permuted(permuted_x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_channel_reshape_defect_is_caught():
    """The check above is not vacuous: a layer fed a channel/position-mixing reshape fails it."""
    layer = randomized_layer(dim=8, dim_out=8, size=(4, 4)).eval()
    x = torch.randn(2, 8, 4, 4)
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(1))

    def defective(inputs):  # [B, C, H, W] -> [B, H*W, C] by reshape, then treated as positions x channels
        tokens = inputs.reshape(2, 16, 8)  # the defect: no permute of the channel axis
        return layer(tokens.transpose(1, 2).reshape(2, 8, 4, 4))

    with torch.no_grad():
        expected = defective(x).reshape(2, 8, 16)[:, :, permutation].reshape(2, 8, 4, 4)
        original = layer.embedding.clone()
        layer.embedding.copy_(original[permutation][:, permutation])
        got = defective(x.reshape(2, 8, 16)[:, :, permutation].reshape(2, 8, 4, 4))
    assert not torch.allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_shared_embedding_and_initialisation():
    embedding = make_position_embedding((4, 4), dim_k=16)
    first = LambdaLayer(64, heads=4, dim_k=16, size=4, embedding=embedding)
    second = LambdaLayer(64, heads=4, dim_k=16, size=4, embedding=embedding)
    assert first.embedding is second.embedding
    assert embedding.shape == (16, 16, 16, 1)
    # paper's init: queries N(0, (d k)^-1/2), keys and values N(0, d^-1/2), E ~ N(0, 1)
    big = LambdaLayer(256, heads=4, dim_k=16, size=8)
    weight_q, weight_v, weight_k = big.to_qkv.weight.split(big.split_sizes)
    assert weight_q.std().item() == pytest.approx((256 * 16) ** -0.5, rel=0.1)
    assert weight_k.std().item() == pytest.approx(256 ** -0.5, rel=0.1)
    assert weight_v.std().item() == pytest.approx(256 ** -0.5, rel=0.1)
    assert big.embedding.std().item() == pytest.approx(1.0, rel=0.05)
    assert big.to_qkv.bias is None


def test_keys_are_normalised_over_context_positions():
    """With zero values except one channel of ones, the content lambda sums softmax weights to 1."""
    layer = randomized_layer(dim=4, dim_out=4, heads=1, dim_k=2, size=(2, 3)).eval()
    with torch.no_grad():
        layer.embedding.zero_()
        layer.norm_qv.weight.zero_()
        layer.norm_qv.bias.fill_(1.0)  # queries and values: all ones
        out = layer(torch.randn(3, 4, 2, 3))
    # y = sum_k q_k * sum_m softmax(K)_km * 1 = k = 2 for every output
    torch.testing.assert_close(out, torch.full_like(out, 2.0))


def test_wrong_map_size_is_refused():
    layer = LambdaLayer(8, heads=2, dim_k=4, size=4)
    with pytest.raises(AssertionError, match="4x4"):
        layer(torch.randn(1, 8, 5, 5))
