"""The layers part of benchmark.py: one lambda layer against multi-head self-attention of the same
width on growing maps (time and peak memory of a forward and backward pass), and against timm's and
lucidrains' lambda layers when they are installed; Bello 2021's Table 2 memory beside each row."""
from __future__ import annotations

import gc
import importlib
import importlib.metadata

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.measuring import MB, is_oom, measure
from figures import Panel, Series, line_chart
from lambda_layer import POSITIONS, LambdaLayer


PAPER_BATCH = 128  # Bello 2021's memory comparison: 128 images of 64x64 positions


class SelfAttention(nn.Module):
    """Multi-head self-attention over all H*W positions of a [B, d, H, W] map, content only.

    ``fused=False`` materialises the b x h x n x m attention maps (softmax(QK^T / sqrt(d_h)) V), as
    in Bello 2021's comparison; ``fused=True`` calls F.scaled_dot_product_attention.
    """

    def __init__(self, dim: int, heads: int, fused: bool):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dim, height, width = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, self.heads, dim // self.heads, height * width)  # b, 3, h, d_h, n
        queries, keys, values = qkv.transpose(-1, -2).unbind(1)                            # b, h, n, d_h each
        if self.fused:
            out = F.scaled_dot_product_attention(queries, keys, values)                     # b, h, n, d_h
        else:
            scale = (dim // self.heads) ** -0.5
            attention = (queries @ keys.transpose(-1, -2) * scale).softmax(dim=-1)         # b, h, n, m
            out = attention @ values                                                        # b, h, n, d_h
        return out.transpose(-1, -2).reshape(b, dim, height, width)                         # b, d, H, W


def lambda_layer(args, size: int, mode: str) -> nn.Module:
    """Our LambdaLayer in position mode `mode` ("conv": an r x r context, r = --lambda-r)."""
    r = args.lambda_r if mode == "conv" else None
    return LambdaLayer(args.width, args.width, heads=args.heads, dim_k=args.qk_size, size=size, position=mode, r=r)


def timm_lambda_layer(args, size: int, r: int | None) -> nn.Module:
    """timm's LambdaLayer: relative position embeddings over the whole map (r=None) or a lambda convolution."""
    from timm.layers.lambda_layer import LambdaLayer as TimmLambdaLayer
    return TimmLambdaLayer(args.width, args.width, feat_size=(size, size), num_heads=args.heads,
                           dim_head=args.qk_size, r=r)


# optional benchmark extras, distribution -> module: timm, and lucidrains' layer (pip install lambda-networks)
EXTRAS = {"timm": "timm", "lambda-networks": "lambda_networks"}


def extra_version(distribution: str) -> str | None:
    """The installed version of an optional extra, None when it cannot be imported."""
    try:
        importlib.import_module(EXTRAS[distribution])
    except ImportError:
        return None
    return importlib.metadata.version(distribution)


def extra_status(distribution: str) -> str:
    version = extra_version(distribution)
    return f"{distribution} {version}" if version else f"{distribution} not installed"


def lucidrains_lambda_layer(args, size: int, r: int | None) -> nn.Module:
    """lucidrains/lambda-networks' LambdaLayer (PyPI lambda-networks): global relative (n = size) or r x r."""
    from lambda_networks import LambdaLayer as LucidrainsLambdaLayer
    return LucidrainsLambdaLayer(args.width, dim_out=args.width, dim_k=args.qk_size, heads=args.heads,
                                 n=None if r else size, r=r)


def layer_builders(args) -> dict:
    builders = {f"lambda ({mode})": (lambda size, mode=mode: lambda_layer(args, size, mode)) for mode in POSITIONS}
    builders["attention (materialised)"] = lambda size: SelfAttention(args.width, args.heads, fused=False)
    builders["attention (SDPA)"] = lambda size: SelfAttention(args.width, args.heads, fused=True)
    if extra_version("timm"):
        builders["timm lambda (relative)"] = lambda size: timm_lambda_layer(args, size, None)
        builders[f"timm lambda (conv, r={args.lambda_r})"] = lambda size: timm_lambda_layer(args, size, args.lambda_r)
    if extra_version("lambda-networks"):
        builders["lucidrains lambda (relative)"] = lambda size: lucidrains_lambda_layer(args, size, None)
        builders[f"lucidrains lambda (conv, r={args.lambda_r})"] = (
            lambda size: lucidrains_lambda_layer(args, size, args.lambda_r))
    return builders


def table2_floats(name: str, args, size: int, batch: int) -> int | None:
    """Bello 2021, Table 2 memory: lambda k n m + b n k v (global embeddings), b n k v (lambda
    convolution), attention b h n m."""
    n = size * size
    lambdas = batch * n * args.qk_size * (args.width // args.heads)
    if name.startswith("attention (materialised)"):
        return batch * args.heads * n * n
    if "lambda" in name and "conv" in name:
        return lambdas
    if "lambda" in name:
        return args.qk_size * n * n + lambdas
    return None


def benchmark_layer(name: str, build, args, size: int, device: torch.device, limit_bytes: float | None) -> dict:
    """Forward + backward of one layer on a [layer_batch, d, size, size] map; "OOM" when it does not fit."""
    row = {"layer": name, "size": size, "batch": args.layer_batch}
    floats = table2_floats(name, args, size, args.layer_batch)
    row["table2_mb"] = None if floats is None else 4 * floats / MB
    if limit_bytes is not None and floats is not None and 3 * 4 * floats > limit_bytes:
        row.update(status="OOM", note=f"skipped: 3 x the Table 2 memory exceeds the {limit_bytes / 2**30:.1f} GB limit")
        return row
    layer = x = None
    try:
        torch.manual_seed(0)
        layer = build(size).to(device).train()
        x = torch.randn(args.layer_batch, args.width, size, size, device=device, requires_grad=True)

        # a dense output gradient in the output's layout, as the next layer's backward gives it (sum()'s
        # gradient is expanded, stride 0, which sends a batched matmul to a loop over its batch)
        grad = torch.randn_like(layer(x).float())

        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).float().backward(grad)

        result = measure(step, device, args.warmup, args.iters, [*layer.parameters(), *layer.buffers(), x])
        row.update(status="ok", time_ms=1000 * result["median_s"], peak_mb=result["peak_mb"])
    except NotImplementedError as error:
        row.update(status="n/a", note=str(error))
    except (RuntimeError, MemoryError) as error:
        if not is_oom(error):
            raise
        row.update(status="OOM", note=str(error).splitlines()[0][:200])
    finally:
        del layer, x
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def layer_targets(layers: list[dict], args) -> dict:
    """At the largest map: materialised attention's peak memory over each lambda layer's (goal 10x,
    beside Bello 2021's Table 2 ratio at batch 128); at each map, timm's relative layer's time over ours."""
    found = {}
    largest = max(args.sizes)
    attention = next((r for r in layers if r["layer"] == "attention (materialised)" and r["size"] == largest), None)
    for r in layers:
        if r["layer"].startswith("lambda") and r["size"] == largest and attention and r.get("status") == "ok":
            measured = attention.get("peak_mb") / r["peak_mb"] if attention.get("status") == "ok" else None
            paper = (table2_floats("attention (materialised)", args, largest, PAPER_BATCH)
                     / table2_floats(r["layer"], args, largest, PAPER_BATCH))
            found[f"memory_ratio_{r['layer']}_{largest}x{largest}"] = {
                "value": measured, "target": 10, "met": None if measured is None else measured >= 10,
                "analytic_table2_ratio_at_batch_128": paper,
                "note": f"materialised attention / lambda peak memory, batch {args.layer_batch}"}
    ours = "lambda (relative)"  # timm's layer is relative and global too
    ok = {(r["layer"], r["size"]): r for r in layers if r.get("status") == "ok"}
    for size in args.sizes:
        if (ours, size) in ok and ("timm lambda (relative)", size) in ok:
            ratio = ok[("timm lambda (relative)", size)]["time_ms"] / ok[(ours, size)]["time_ms"]
            found[f"speed_vs_timm_{size}x{size}"] = {
                "value": ratio, "target": 1.0, "met": ratio >= 1.0,
                "note": f"timm's LambdaLayer (relative, global) time / {ours} time, forward + backward"}
    return found


def layers_markdown(layers: list[dict], settings: dict) -> list[str]:
    lines = [f"## Layers (d = {settings['width']}, h = {settings['heads']}, k = {settings['qk_size']}, "
             f"batch {settings['layer_batch']}, forward + backward)", "",
             "| map | layer | time ms | peak MB | Table 2 memory MB |", "|---|---|---|---|---|"]
    for r in layers:
        table2 = "-" if r["table2_mb"] is None else f"{r['table2_mb']:.1f}"
        if r["status"] == "ok":
            lines.append(f"| {r['size']}x{r['size']} | {r['layer']} | {r['time_ms']:.2f} | {r['peak_mb']:.1f} | {table2} |")
        else:
            lines.append(f"| {r['size']}x{r['size']} | {r['layer']} | {r['status']} | {r['status']} | {table2} |")
    return lines


def plot(report: dict, path: str) -> None:
    """Two panels, time and peak memory against map size, log scales, one line per layer; OOMs left out."""
    settings = report["settings"]
    names = list(dict.fromkeys(r["layer"] for r in report["layers"]))
    panels = []
    for key, title, unit in (("time_ms", "time per forward + backward", "time (ms)"),
                             ("peak_mb", "peak memory", "peak memory (MB)")):
        series = []
        for name in names:
            rows = [r for r in report["layers"] if r["layer"] == name and r["status"] == "ok" and r[key] > 0]
            series.append(Series(name, [r["size"] for r in rows], [r[key] for r in rows]))
        panels.append(Panel(title, "map side n (an n x n feature map)", unit, series, x_log=2, y_log=10))
    line_chart(panels, path, title=f"batch {settings['layer_batch']}, d {settings['width']}, "
                                   f"h {settings['heads']}; {report['machine']['device_name']}")
