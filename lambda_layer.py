"""Lambda layer for [B, C, H, W] feature maps.

Bello, "LambdaNetworks: Modeling long-range interactions without attention", ICLR 2021,
arXiv 2102.08602.

Implemented: the multi-query lambda layer with softmax-normalised keys, batch-normalised queries
and values, no biases, intra-depth u, and three ways to compute the position lambdas
lambda_p[n] = sum_m E[n, m]^T V[m] (the content lambda is the same in all of them):

- ``"absolute"``: global context, one embedding per (query, context) pair, E of shape
  (n, m, k, u) for a fixed H x W map: the CIFAR-10 reproduction's layer.
- ``"relative"``: global context, E[n, m] = R[m - n] read from a table R of shape
  (2H-1, 2W-1, k, u) indexed by the offset of the context position from the query: translation
  equivariant. The (n, m) -> table-row index is a non-persistent buffer.
- ``"conv"``: local context of r x r positions, the lambda convolution: a 3D convolution of the
  values (u channels) over (H, W, v) with an r x r x 1 kernel per key dimension, kernel parameter
  of shape (k, u, 1, r, r), zero padding r // 2 in H and W. Works for any H x W; no (n, m, k)
  tensor exists, except on the map the layer was made for (``size=``) when the kernel covers it
  (r >= 2H-1, 2W-1): then it is a global relative context with the kernel as its table, and E is
  gathered from the kernel as in "relative" (``gathers``; same output, tested).

Embeddings may be shared between layers (pass ``embedding=``). Not implemented: a context other
than the input map itself (C = X in every mode).

Cost per layer, batch b, n = m = H*W positions, h heads, v = dim_out / h (paper, Table 2):

========== ====================== ============================== ===================================
position   parameters of E        time (position lambdas)        memory (activations + E)
========== ====================== ============================== ===================================
absolute   n m k u                Theta(b n m k u v)             Theta(n m k u + b n k v)
relative   (2H-1)(2W-1) k u       Theta(b n m k u v)             Theta(n m k u + b n k v)
conv       r^2 k u                Theta(b n r^2 k u v)           Theta(b n k v), independent of r
========== ====================== ============================== ===================================

("conv" on a map its kernel covers gathers E: Theta(b n m k u v) time, m <= r^2, and n m k u more
memory, 256 KB on an 8x8 map with k 16.)

plus, in every mode, the projections Theta(b n d (hk + ku + vu)), the content lambda
Theta(b m k u v) and applying the lambdas to the queries Theta(b h n k v). "relative" gathers its
(n, m, k, u) E from the table in each forward pass (the paper's Theta(k n m) memory), and so does
"conv" on a map its kernel covers (where n m <= n r^2).
The lambdas are always computed before they meet the queries (lambda_p = E^T V first), and
lambda_c + lambda_p is formed before the one contraction with the queries.

Kernels and layouts (docs/lambda-speed.md has the measurements): a handful of kernel-launching aten
ops per training forward + backward (u = 1: 21 absolute, 23 relative or conv gathering E, 20
as the 3D convolution; u = 3: 22, 24, 22; counted by ``benchmark.py``, asserted in
tests/test_lambda_modes.py), and every contraction a batched GEMM on views, no copies when u = 1
except the 3D convolution's one copy of the values into its channels-last volume:

- one 1x1 convolution projects queries, values and keys (one GEMM); its kernel has channels_last
  strides, so the output is positions-major ([b, n, channels] in memory) whatever x's layout;
- one batch norm normalises queries and values together (per-channel statistics: exact), without
  incrementing the batch counter that only momentum=None reads (``UncountedBatchNorm2d``);
- content lambda: bmm [b, k, m*u] x [b, m*u, v]; position lambdas: E as the [n*k, m*u] matrix times
  the same values, as a bmm of E expanded over b when E is small (``E_BATCHED_ENTRIES``: maps up
  to 8x8) and as one GEMM [n*k, m*u] x [m*u, b*v] that reads E once when it is larger (a copy of
  the values to [m*u, b*v] and of the product to [b, n, k, v]); or the lambda convolution as a
  channels-last 3D convolution over (H, W, v) whose output is already [b, n, v, k] in memory
  ("relative" on maps of <= RELATIVE_AS_CONV_POSITIONS positions too, with its table as the
  kernel: no gather);
- tables and kernels are stored in the layout their path reads (``make_position_embedding``):
  gathered rows that are E^T as [m*u, n*k] as they come, or the layout of the 3D convolution;
- queries: bmm [b*n, h, k] x [b*n, k, v]; the output is returned channels_last (a view);
- backward of the global modes (``GlobalLambdas``): E's gradient is one GEMM over (b, v), after
  copying the lambdas' gradient and the values to [n*k, b*v] and [m*u, b*v].
u > 1 costs a copy of the values (and in "conv" a copy of the volume's gradient): their (m, u) axes
are not adjacent in memory.

Mixed precision: the 1x1 projection follows autocast; the batch norm, the key softmax and every
lambda contraction run in float32 (autocast disabled inside the layer; float64 stays float64) and
the output is cast back to the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITIONS = ("absolute", "relative", "conv")
# Global relative and a lambda convolution whose kernel covers the map (r >= 2H-1, 2W-1) are one
# function: E[n, m] = table[m - n]. Maps of at most this many positions run it as the 3D convolution
# (at most 2.25x the multiply-adds of the gathered E, on 2x2 maps, and no gather), larger maps as
# the gathered E and a GEMM (the conv's backward, with its one input channel, is slow: on a CPU 6x
# its forward, 42 ms of a 62 ms layer at 8x8, batch 128)
RELATIVE_AS_CONV_POSITIONS = 4
# E of at most this many entries (an 8x8 map with k 16, u 1: 256 KB in float32, cache-resident) meets the
# values in a bmm over the batch; a larger one in one GEMM that reads it once (GlobalLambdas)
E_BATCHED_ENTRIES = 64 * 64 * 16


def gathers(position: str, size: tuple[int, int] | None, r: int | None = None) -> bool:
    """Whether a "relative" or "conv" layer made for an H x W map gathers E from its table or kernel
    (else it runs the 3D convolution): more than RELATIVE_AS_CONV_POSITIONS positions and, for "conv",
    a kernel that covers the map."""
    if size is None or position == "absolute" or size[0] * size[1] <= RELATIVE_AS_CONV_POSITIONS:
        return False
    return position == "relative" or (r >= 2 * size[0] - 1 and r >= 2 * size[1] - 1)


def make_position_embedding(size: tuple[int, int] | None, dim_k: int, dim_u: int = 1,
                            position: str = "absolute", r: int | None = None) -> nn.Parameter:
    """E ~ N(0, 1) as in the paper: (n, m, k, u), (2H-1, 2W-1, k, u) or conv kernel (k, u, 1, r, r), stored
    in the memory layout the layer's forward reads without a copy (``stored_as``); for "conv", ``size``
    (optional) is the map the layer is made for."""
    if position == "conv":
        kernel = torch.randn(dim_k, dim_u, 1, r, r)
        # gathered rows [u*r*r, k] (stored u, 1, r, r, k), or the 3D convolution's own layout
        return nn.Parameter(stored_as(kernel, (1, 2, 3, 4, 0)) if gathers(position, size, r) else kernel)
    height, width = size
    if position == "relative":
        table = torch.randn(2 * height - 1, 2 * width - 1, dim_k, dim_u)
        # gathered rows [u*(2H-1)*(2W-1), k] (stored u, 2H-1, 2W-1, k), or the conv kernel's gradient's
        # channels-last layout (stored k, 2H-1, 2W-1, u); with u = 1 the first is the contiguous one
        return nn.Parameter(stored_as(table, (3, 0, 1, 2) if gathers(position, size) else (2, 0, 1, 3)))
    n = height * width
    # indexed E[n, m, k, u] as in the paper, stored (n, k, m, u): the [n*k, m*u] matrix of GlobalLambdas
    return nn.Parameter(torch.randn(n, dim_k, n, dim_u).permute(0, 2, 1, 3))  # n, m, k, u


def stored_as(tensor: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` (same shape and values) with its axes laid out in memory in ``order``, outermost first.
    .to(), state_dict() and load_state_dict() keep the layout."""
    stored = tensor.permute(order).contiguous()
    return stored.permute(tuple(order.index(axis) for axis in range(tensor.dim())))


def relative_index(size: tuple[int, int], table_size: tuple[int, int] | None = None) -> torch.Tensor:
    """[n, m] row of the flattened table (2H-1 x 2W-1 unless ``table_size``, an odd r x r kernel's
    side) holding offset m - n (context minus query), the offset (0, 0) at the table's centre."""
    height, width = size
    table_rows, table_cols = table_size or (2 * height - 1, 2 * width - 1)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # n
    offset_rows = rows[None, :] - rows[:, None] + table_rows // 2  # n, m: m_y - n_y + centre
    offset_cols = cols[None, :] - cols[:, None] + table_cols // 2  # n, m: m_x - n_x + centre
    return offset_rows * table_cols + offset_cols  # n, m


class UncountedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d (momentum 0.1) that does not increment ``num_batches_tracked``: the counter serves
    only momentum=None (a cumulative average), and its increment is one kernel per training step.
    The buffer stays (at 0), so SyncBatchNorm conversion under torchrun works as for any norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.momentum is not None and self.track_running_stats, "an exponential average needs no counter"
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class GlobalLambdas(torch.autograd.Function):
    """lambda[b, n*k, v] = E V[b] + lambda_c[b] (for every n), lambda_c = K[b]^T V[b]: the lambdas of the
    global modes, E as the [n*k, m*u] matrix, keys [b, m*u, k], values [b, m*u, v].

    A small E (at most E_BATCHED_ENTRIES: an 8x8 map) meets the values in b GEMMs, a bmm of E
    expanded over b that writes the lambdas in place; a larger one in one GEMM over the whole batch,
    [n*k, m*u] x [m*u, b*v], which reads E once where the bmm reads it b times (64 MB each at 32x32
    maps: there the bmm took 1.9x the time of the whole layer). The backward is what autograd would
    do, in as many kernels, except that E's gradient is one GEMM over (b, v) (b GEMMs into a
    [b, n*k, m*u] tensor and its sum over b took 3x as long at 8x8, batch 128).
    """

    @staticmethod
    def forward(ctx, embedding: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        b, mu, v = values.shape
        nk, k = embedding.shape[0], keys.shape[-1]
        content_lambda = torch.bmm(keys.transpose(1, 2), values)                      # b, k, v
        if embedding.numel() <= E_BATCHED_ENTRIES:
            lambdas = torch.bmm(embedding.expand(b, -1, -1), values)                   # b, n*k, v
            lambdas.view(b, -1, k, v).add_(content_lambda[:, None])                    # b, n, k, v
            ctx.save_for_backward(embedding, keys, values)
            return lambdas
        value_rows = values.permute(1, 0, 2).reshape(mu, b * v)                        # m*u, b*v (a copy)
        position_lambdas = (embedding @ value_rows).view(nk // k, k, b, v)             # n, k, b, v
        lambdas = values.new_empty(b, nk // k, k, v)
        torch.add(position_lambdas.permute(2, 0, 1, 3), content_lambda[:, None], out=lambdas)  # b, n, k, v
        ctx.save_for_backward(embedding, keys, values, value_rows)
        return lambdas.view(b, nk, v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        embedding, keys, values, *value_rows = ctx.saved_tensors
        b, nk, v = grad.shape
        k = keys.shape[-1]
        grad_content = grad.reshape(b, nk // k, k, v).sum(dim=1)                           # b, k, v
        grad_rows = grad.permute(1, 0, 2).reshape(nk, b * v)                               # n*k, b*v (a copy)
        if value_rows:  # the one-GEMM forward
            (value_rows,) = value_rows
            grad_values = (embedding.t() @ grad_rows).view(-1, b, v).permute(1, 0, 2)      # b, m*u, v
            grad_values = torch.baddbmm(grad_values, keys, grad_content)                   # + K lambda_c grad
        else:
            value_rows = values.permute(1, 0, 2).reshape(-1, b * v)                        # m*u, b*v (a copy)
            grad_values = torch.bmm(embedding.t().expand(b, -1, -1), grad)                 # b, m*u, v
            grad_values.baddbmm_(keys, grad_content)                                       # + K lambda_c grad
        grad_keys = torch.bmm(values, grad_content.transpose(1, 2))                        # b, m*u, k
        grad_embedding = None
        if ctx.needs_input_grad[0]:  # one GEMM over (b, v), written in E's layout (E^T contiguous: "relative")
            if embedding.is_contiguous():
                grad_embedding = grad_rows @ value_rows.t()                                # n*k, m*u
            else:
                grad_embedding = (value_rows @ grad_rows.t()).t()                          # n*k, m*u
        return grad_embedding, grad_keys, grad_values


class LambdaLayer(nn.Module):
    """Multi-query lambda layer (Bello 2021, Sec. 3 and 4).

    Every position n of the input produces ``heads`` queries of size k; keys (size k) and values
    (size v) of intra-depth u are computed from the context positions m. The heads share the same
    lambdas, and each head outputs v = dim_out / heads channels, so the output has
    heads * v = dim_out channels. The context is the whole map ("absolute", "relative") or the
    r x r positions around each query ("conv").

    Args:
        dim: input channels d.
        dim_out: output channels (default ``dim``); must be divisible by ``heads``.
        heads: number of queries h per position.
        dim_k: query / key size k.
        dim_u: intra-depth u.
        r: local context size of the lambda convolution (odd); only with ``position="conv"``.
        size: (H, W) of the feature map; required by "absolute" and "relative"; optional for "conv",
            which runs on any map and, on the map it was made for, gathers E from its kernel when
            that kernel covers the map (``gathers``).
        position: "absolute", "relative" or "conv" (module docstring).
        embedding: an existing E of this mode's shape to share with other layers.
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, heads: int = 4, dim_k: int = 16,
                 dim_u: int = 1, r: int | None = None, size: tuple[int, int] | int | None = None,
                 position: str = "absolute", embedding: nn.Parameter | None = None):
        super().__init__()
        dim_out = dim_out or dim
        assert dim_out % heads == 0, f"dim_out={dim_out} must be divisible by heads={heads}"
        self.position = position
        self.size = self._checked_size(position, r, size)
        self.r = r
        self.dim, self.heads, self.dim_k, self.dim_u = dim, heads, dim_k, dim_u
        self.dim_v = dim_out // heads

        # one 1x1 projection: output channels queries (h, k), values (u, v), keys (u, k); one batch
        # norm over queries and values (per-channel statistics: the same as two norms)
        self.to_qkv = nn.Conv2d(dim, sum(self.split_sizes), 1, bias=False)
        # the 1x1 kernel gets channels_last strides: the convolution then writes a channels-last output
        # (positions outermost) from a channels-first x too, and its gradient needs no re-layout
        self.to_qkv.weight = nn.Parameter(torch.empty_strided(self.to_qkv.weight.shape, (dim, 1, dim, dim)))
        self.norm_qv = UncountedBatchNorm2d(self.split_sizes[0] + self.split_sizes[1])

        if embedding is None:
            embedding = make_position_embedding(self.size, dim_k, dim_u, position, r)
        expected = self._embedding_shape()
        assert tuple(embedding.shape) == expected, (
            f"{position} embedding shape {tuple(embedding.shape)} != {expected}")
        self.embedding = embedding
        if gathers(position, self.size, r):
            # [m, u, n]: the row of the [u*rows*cols, k] table (the relative table, or the conv kernel with
            # rows = cols = r) holding E[n, m, :, u]; the gather then yields E^T as the [m*u, n*k] matrix
            table_size = tuple(self._embedding_shape()[:2]) if position == "relative" else (r, r)
            index = relative_index(self.size, table_size).t()[:, None, :]  # m, 1, n
            index = index + table_size[0] * table_size[1] * torch.arange(dim_u)[:, None]  # m, u, n
            self.register_buffer("relative_index", index.contiguous(), persistent=False)
        self.reset_parameters()

    @property
    def split_sizes(self) -> tuple[int, int, int]:
        """Channels of queries, values and keys in ``to_qkv``'s output, in that order."""
        return self.heads * self.dim_k, self.dim_u * self.dim_v, self.dim_u * self.dim_k

    @staticmethod
    def _checked_size(position: str, r: int | None, size) -> tuple[int, int] | None:
        """(H, W), or None for "conv" without a size; refuses arguments that do not fit the mode."""
        if position not in POSITIONS:
            raise ValueError(f"position={position!r} is not one of {', '.join(POSITIONS)}")
        if position == "conv":
            if r is None or r < 1 or r % 2 == 0:
                raise ValueError(f"position='conv' needs an odd local context size r >= 1, got r={r}")
            if size is None:
                return None
        elif r is not None:
            raise ValueError(f"r={r} is the local context of position='conv'; {position!r} has a global context")
        if size is None:
            raise ValueError(f"size=(H, W) is required for the {position} position embeddings")
        return (size, size) if isinstance(size, int) else tuple(size)

    def _embedding_shape(self) -> tuple[int, ...]:
        k, u = self.dim_k, self.dim_u
        if self.position == "conv":
            return (k, u, 1, self.r, self.r)
        height, width = self.size
        if self.position == "relative":
            return (2 * height - 1, 2 * width - 1, k, u)
        return (height * width, height * width, k, u)

    def reset_parameters(self) -> None:
        # Bello 2021, Appendix: queries N(0, (d k)^-1/2), keys and values N(0, d^-1/2)
        queries, values, keys = self.to_qkv.weight.data.split(self.split_sizes)
        nn.init.normal_(queries, std=(self.dim * self.dim_k) ** -0.5)
        nn.init.normal_(values, std=self.dim ** -0.5)
        nn.init.normal_(keys, std=self.dim ** -0.5)
        # E ~ N(0, 1) is drawn in make_position_embedding: a shared E is initialised once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        assert self.position == "conv" or (height, width) == self.size, (
            f"input map {height}x{width} != the {self.size[0]}x{self.size[1]} map the {self.position} "
            f"embeddings were made for")
        n, h, k, u, v = height * width, self.heads, self.dim_k, self.dim_u, self.dim_v
        # channels_last (see __init__): positions outermost, so queries, keys and values are [b*n, channels] views
        qkv = self.to_qkv(x)  # b, hk+uv+uk, H, W
        # fp16/bf16 would round the softmax and the sums over m; float64 stays float64
        dtype = torch.promote_types(qkv.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            qv, keys = qkv.to(dtype).split((h * k + u * v, u * k), dim=1)
            qv = self.norm_qv(qv).permute(0, 2, 3, 1).reshape(b, n, h * k + u * v)  # b, n, hk+uv (a view)
            queries, values = qv.split((h * k, u * v), dim=-1)
            values = values.reshape(b, n * u, v)  # b, m*u, v (a view when u = 1)
            keys = keys.permute(0, 2, 3, 1).reshape(b, n, u * k).softmax(dim=1).reshape(b, n * u, k)  # b, m*u, k
            # lambda_c + lambda_p before the queries: one contraction with the queries instead of two
            lambdas = self._lambdas(keys, values, height, width)  # b, n, k, v
            out = torch.bmm(queries.reshape(b * n, h, k), lambdas.reshape(b * n, k, v))  # b*n, h, v
        return out.reshape(b, height, width, h * v).permute(0, 3, 1, 2).to(x.dtype)  # b, h*v, H, W (channels_last)

    def _lambdas(self, keys: torch.Tensor, values: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """lambda_c[b] + lambda_p[b, n] for every n: [b, n, k, v]; keys [b, m*u, k], values [b, m*u, v].

        lambda_p[b, n, k, v] = sum_{m, u} E[n, m, k, u] V[b, m, u, v].
        """
        b, _, v = values.shape
        n, k, u = height * width, self.dim_k, self.dim_u
        embedding = self.embedding.to(values.dtype)
        if self.position == "absolute":
            embedding = embedding.permute(0, 2, 1, 3).reshape(n * k, n * u)  # n*k, m*u (a view: stored n, k, m, u)
        elif gathers(self.position, self.size, self.r) and (height, width) == self.size:
            if self.position == "relative":
                table = embedding.permute(3, 0, 1, 2).reshape(-1, k)     # u*(2H-1)*(2W-1), k (a view: stored so)
            else:
                table = embedding.permute(1, 2, 3, 4, 0).reshape(-1, k)  # u*r*r, k (a view: stored so)
            rows = F.embedding(self.relative_index, table)  # m, u, n, k: E^T
            embedding = rows.reshape(n * u, n * k).t()       # n*k, m*u (the transpose of a contiguous E^T)
        else:  # the 3D convolution; a relative table is the kernel of r = 2H-1 (2W-1)
            kernel = embedding if self.position == "conv" else embedding.permute(2, 3, 0, 1).unsqueeze(2)  # k, u, 1, ., .
            # computed as (V^T K)^T: the keys' gradient then comes out [b, m*u, k], the softmax's layout
            content_lambda = torch.bmm(values.transpose(1, 2), keys).transpose(1, 2)  # b, k, v
            return self._conv_position_lambdas(values, kernel, height, width) + content_lambda[:, None]
        return GlobalLambdas.apply(embedding, keys, values).reshape(b, n, k, v)  # b, n, k, v

    def _conv_position_lambdas(self, values: torch.Tensor, kernel: torch.Tensor, height: int,
                               width: int) -> torch.Tensor:
        """The lambda convolution with an odd-sided kernel (k, u, 1, r_y, r_x), zero padding r // 2: a 3D
        convolution over (H, W, v) with u channels, written channels-last."""
        b, _, v = values.shape
        pad_y, pad_x = kernel.shape[-2] // 2, kernel.shape[-1] // 2
        volume = values.reshape(b, height, width, self.dim_u, v).permute(0, 3, 1, 2, 4)  # b, u, H, W, v
        volume = volume.contiguous(memory_format=torch.channels_last_3d)                # memory: b, H, W, v, u
        lambdas = F.conv3d(volume, kernel.permute(0, 1, 3, 4, 2), padding=(pad_y, pad_x, 0))  # b, k, H, W, v
        return lambdas.permute(0, 2, 3, 1, 4).reshape(b, height * width, self.dim_k, v)      # b, n, k, v
