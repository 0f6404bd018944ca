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
- ``"conv"``: local context of r x r positions, the lambda convolution (Sec. 4): a 3D convolution
  of the values (u channels) over (H, W, v) with an r x r x 1 kernel per key dimension, kernel
  parameter of shape (k, u, 1, r, r), zero padding r // 2 in H and W. Works for any H x W; no
  (n, m, k) tensor exists.

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

plus, in every mode, the projections Theta(b n d (hk + ku + vu)), the content lambda
Theta(b m k u v) and applying the lambdas to the queries Theta(b h n k v). "relative" gathers its
(n, m, k, u) E from the table in each forward pass (the paper's Theta(k n m) memory). The lambdas
are computed before they meet the queries (lambda_p = E^T V first), and lambda_c + lambda_p is
formed before the one contraction with the queries.

The layer as the paper states it (``LambdaLayer.lambdas``, ``LambdaLayer.forward``) comes first;
the one faster formulation kept (measured in docs/lambda-speed.md), which the layer picks by
itself, is in the section "Fast paths" at the end of this file, tested equal to that statement.

Mixed precision: the 1x1 projection follows autocast; the batch norm, the key softmax and every
lambda contraction run in float32 (autocast disabled inside the layer; float64 stays float64) and
the output is cast back to the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITIONS = ("absolute", "relative", "conv")


def check_position(position: str) -> None:
    if position not in POSITIONS:
        raise ValueError(f"position={position!r} is not one of {', '.join(POSITIONS)}")


def make_position_embedding(size: tuple[int, int] | None, dim_k: int, dim_u: int = 1,
                            position: str = "absolute", r: int | None = None) -> nn.Parameter:
    """E ~ N(0, 1) as in the paper: (n, m, k, u), (2H-1, 2W-1, k, u) or conv kernel (k, u, 1, r, r)."""
    check_position(position)  # before any allocation (an unknown mode would get an absolute-sized E)
    if position == "conv":
        return nn.Parameter(torch.randn(dim_k, dim_u, 1, r, r))
    height, width = size
    if position == "relative":
        return nn.Parameter(torch.randn(2 * height - 1, 2 * width - 1, dim_k, dim_u))
    return nn.Parameter(torch.randn(height * width, height * width, dim_k, dim_u))


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
            which runs on any map (on the map it was made for it may take a fast path).
        position: "absolute", "relative" or "conv" (module docstring).
        embedding: an existing E of this mode's shape to share with other layers.
    """

    def __init__(self, dim: int, dim_out: int | None = None, *, heads: int = 4, dim_k: int = 16,
                 dim_u: int = 1, r: int | None = None, size: tuple[int, int] | int | None = None,
                 position: str = "absolute", embedding: nn.Parameter | None = None):
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % heads:
            raise ValueError(f"dim_out={dim_out} must be divisible by heads={heads}")
        self.position = position
        self.size = self._checked_size(position, r, size)
        self.r = r
        self.dim, self.heads, self.dim_k, self.dim_u = dim, heads, dim_k, dim_u
        self.dim_v = dim_out // heads

        # one 1x1 projection: output channels queries (h, k), values (u, v), keys (u, k); one batch
        # norm over queries and values (per-channel statistics: the same as two norms)
        self.to_qkv = nn.Conv2d(dim, sum(self.split_sizes), 1, bias=False)
        self.norm_qv = nn.BatchNorm2d(self.split_sizes[0] + self.split_sizes[1])

        if embedding is None:
            embedding = make_position_embedding(self.size, dim_k, dim_u, position, r)
        expected = self._embedding_shape()
        assert tuple(embedding.shape) == expected, (
            f"{position} embedding shape {tuple(embedding.shape)} != {expected}")
        self.embedding = embedding
        if position == "relative":
            self.register_buffer("relative_index", relative_index(self.size), persistent=False)  # n, m
        elif kernel_covers(r, self.size):  # the fast path below: the kernel's tap of each (n, m)
            self.register_buffer("relative_index", relative_index(self.size, (r, r)), persistent=False)  # n, m
        self.reset_parameters()

    @property
    def split_sizes(self) -> tuple[int, int, int]:
        """Channels of queries, values and keys in ``to_qkv``'s output, in that order."""
        return self.heads * self.dim_k, self.dim_u * self.dim_v, self.dim_u * self.dim_k

    @staticmethod
    def _checked_size(position: str, r: int | None, size) -> tuple[int, int] | None:
        """(H, W), or None for "conv" without a size; refuses arguments that do not fit the mode."""
        check_position(position)
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

    # --- the layer as the paper states it (Sec. 3-4) ---

    def lambdas(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """queries [b, h, k, n], content_lambda [b, k, v] and position_lambdas [b, n, k, v] of x [b, d, H, W]."""
        b, _, height, width = x.shape
        assert self.position == "conv" or (height, width) == self.size, (
            f"input map {height}x{width} != the {self.size[0]}x{self.size[1]} map the {self.position} "
            f"embeddings were made for")
        n, h, k, u, v = height * width, self.heads, self.dim_k, self.dim_u, self.dim_v
        qkv = self.to_qkv(x)  # b, hk+uv+uk, H, W
        # fp16/bf16 would round the softmax and the sums over m; float64 stays float64
        dtype = torch.promote_types(qkv.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            qv, keys = qkv.to(dtype).split((h * k + u * v, u * k), dim=1)
            queries, values = self.norm_qv(qv).split((h * k, u * v), dim=1)
            queries = queries.reshape(b, h, k, n)                          # b, h, k, n
            values = values.reshape(b, u, v, n)                            # b, u, v, m
            keys = keys.reshape(b, u, k, n).softmax(dim=-1)                # b, u, k, m: normalised over m
            content_lambda = torch.einsum("bukm,buvm->bkv", keys, values)  # b, k, v
            position_lambdas = self.position_lambdas(values, height, width)  # b, n, k, v
        return queries, content_lambda, position_lambdas

    def position_lambdas(self, values: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """lambda_p[b, n, k, v] = sum_{m, u} E[n, m, k, u] V[b, u, v, m] for values [b, u, v, m]."""
        embedding = self.embedding.to(values.dtype)
        if self.position == "conv" and (height, width) == self.size and kernel_covers(self.r, self.size):
            return lambda_convolution_as_global_context(embedding, self.relative_index, values)
        if self.position == "conv":  # the lambda convolution: a 3D convolution over (H, W, v)
            b, u, v, n = values.shape
            volume = values.reshape(b, u, v, height, width).permute(0, 1, 3, 4, 2)  # b, u, H, W, v
            kernel = embedding.permute(0, 1, 3, 4, 2)                               # k, u, r, r, 1
            lambdas = F.conv3d(volume, kernel, padding=(self.r // 2, self.r // 2, 0))  # b, k, H, W, v
            return lambdas.reshape(b, self.dim_k, n, v).transpose(1, 2)            # b, n, k, v
        if self.position == "relative":  # E[n, m] = R[m - n]
            table = embedding.reshape(-1, self.dim_k, self.dim_u)  # (2H-1)(2W-1), k, u
            embedding = table[self.relative_index]                  # n, m, k, u
        return torch.einsum("nmku,buvm->bnkv", embedding, values)  # b, n, k, v

    def apply_lambdas(self, queries: torch.Tensor, lambdas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y[b, h, v, n] = sum_k q[b, h, k, n] lambda[b, n, k, v] as [b, h*v, H, W] in x's dtype; lambdas
        [b, n, k, v], or [b, 1, k, v] for one lambda shared by all positions (the content lambda)."""
        with torch.autocast(x.device.type, enabled=False):
            out = torch.einsum("bhkn,bnkv->bhvn", queries, lambdas)  # b, h, v, n
        return out.reshape(x.shape[0], -1, *x.shape[2:]).to(x.dtype)  # b, h*v, H, W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries, content_lambda, position_lambdas = self.lambdas(x)
        # lambda_c + lambda_p before the queries: one contraction with the queries instead of two
        return self.apply_lambdas(queries, content_lambda[:, None] + position_lambdas, x)


# --- Fast paths: the same lambdas, computed faster where measured to pay (docs/lambda-speed.md) ---

def kernel_covers(r: int | None, size: tuple[int, int] | None) -> bool:
    """True if an r x r lambda convolution reaches every position of an H x W map from every query."""
    return r is not None and size is not None and r >= 2 * size[0] - 1 and r >= 2 * size[1] - 1


def lambda_convolution_as_global_context(kernel: torch.Tensor, index: torch.Tensor,
                                         values: torch.Tensor) -> torch.Tensor:
    """The lambda convolution on a map its kernel [k, u, 1, r, r] covers, as a global relative
    context whose table is the kernel: E[n, m] = kernel[centre + m - n] (``index`` [n, m], from
    relative_index with table_size (r, r); the taps beyond the map meet only zero padding), so

        lambda_p[b, n, k, v] = einsum("nmku,buvm->bnkv", E, V)

    as "relative" computes it. Equal to the 3D convolution (tests/test_lambda_modes.py), whose
    backward costs the lambda ResNet's step most of its time on the CPU."""
    dim_k, dim_u = kernel.shape[:2]
    table = kernel.permute(3, 4, 0, 1, 2).reshape(-1, dim_k, dim_u)        # r*r, k, u
    return torch.einsum("nmku,buvm->bnkv", table[index], values)            # b, n, k, v
