"""What each lambda layer has learned: how much of its output comes from the content lambda and how
much from the position lambdas, and its learned position embeddings as images.

A lambda layer has no attention map. Two things stand in for one:

- **content and position shares.** The layer's output is y_n = (lambda_c + lambda_p_n)^T q_n. On a
  fixed batch of images, ``content_position_shares`` computes the two parts, lambda_c^T q_n and
  lambda_p_n^T q_n, with the layer's own ``lambdas`` and ``apply_lambdas``, and gives each part's
  norm as a share of the two norms summed.
- **position tables.** ``position_tables`` gives the last lambda layer of each stage as images of a
  few key dimensions k: the relative table R[k] over offsets (2H-1 x 2W-1), the lambda
  convolution's kernel (r x r), or, for absolute embeddings, the mean over queries n of |E[n, m, k]|
  over the positions m (H x W). Each table is averaged over the intra-depth u.

main_general.py logs both at the epochs that draw the confusion matrix. ``nntest.py --checkpoint``
writes the figure next to its confusion matrix.
"""
from __future__ import annotations

import torch
from torch import nn

from lambda_layer import LambdaLayer


def plain_module(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel or torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def lambda_layers(model: nn.Module) -> dict[str, LambdaLayer]:
    """The model's lambda layers by module name, in forward order."""
    return {name: module for name, module in plain_module(model).named_modules() if isinstance(module, LambdaLayer)}


@torch.no_grad()
def content_position_shares(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{layer name: (content share, position share)} of each lambda layer's output on `images`, in
    eval mode. The shares are ||lambda_c^T q|| and ||lambda_p^T q|| over the batch, each divided by their
    sum. The work stays on the device; one transfer at the end."""
    model = plain_module(model)
    layers, inputs = lambda_layers(model), {}
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in layers.items()]
    was_training = model.training
    try:
        model.eval()
        model(images)
        norms = []
        for name, layer in layers.items():
            x = inputs[name]
            queries, content_lambda, position_lambdas = layer.lambdas(x)
            content = layer.apply_lambdas(queries, content_lambda[:, None], x)   # b, h*v, H, W
            position = layer.apply_lambdas(queries, position_lambdas, x)          # b, h*v, H, W
            norms.append(torch.stack([content.float().norm(), position.float().norm()]))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not norms:
        return {}
    norms = torch.stack(norms)                                      # layers, 2
    shares = (norms / norms.sum(dim=1, keepdim=True).clamp_min(1e-30)).tolist()
    return {name: (content, position) for name, (content, position) in zip(layers, shares)}


def position_table(layer: LambdaLayer, keys: int) -> torch.Tensor:
    """The first `keys` key dimensions of the layer's position embedding as images [keys, rows, columns]."""
    embedding = layer.embedding.detach().float()
    if layer.position == "conv":                                     # k, u, 1, r, r
        return embedding.mean(dim=(1, 2))[:keys]                     # keys, r, r
    if layer.position == "relative":                                 # 2H-1, 2W-1, k, u
        return embedding.mean(dim=3).permute(2, 0, 1)[:keys]         # keys, 2H-1, 2W-1
    height, width = layer.size                                       # E: n, m, k, u
    mean_over_queries = embedding.mean(dim=3).abs().mean(dim=0)      # m, k
    return mean_over_queries.T.reshape(-1, height, width)[:keys]     # keys, H, W


def position_tables(model: nn.Module, keys: int = 4) -> dict[str, torch.Tensor]:
    """{layer name: position_table} of the last lambda layer of each stage (layer1 ... layer4)."""
    last = {}
    for name, layer in lambda_layers(model).items():
        last[name.split(".")[0]] = (name, layer)
    return {name: position_table(layer, keys).cpu() for name, layer in last.values()}


def position_figure(model: nn.Module, title: str = "", keys: int = 4):
    """The figure of position_tables (figures.position_table_figure), or None without lambda layers."""
    from figures import position_table_figure

    tables = position_tables(model, keys)
    if not tables:
        return None
    position = next(iter(lambda_layers(model).values())).position
    what = {"relative": "relative table R[k] over offsets (2H-1 x 2W-1)",
            "conv": "lambda-convolution kernel (r x r)",
            "absolute": "mean over queries of |E[n, m, k]| over positions m (H x W)"}[position]
    return position_table_figure(tables, f"{title}{': ' if title else ''}{what}", signed=position != "absolute")
