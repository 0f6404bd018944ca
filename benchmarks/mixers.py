"""The mixers part of benchmark.py: each 3x3 convolution of the baseline and each lambda layer that
replaces it, at the widths, map sizes and strides of the network; the network's totals against the
floor (the lambda network with identities for its lambda layers); kernel-launching ops per layer and
per training step (docs/lambda-speed.md)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
import model_preparation as prep
import resnet_lambda
from benchmarks.measuring import count_kernels, measure
from benchmarks.models import benchmark_model, model_config, model_variants
from resnet import STAGE_WIDTHS
from speed import resolve_speed


def network_mixers(model: nn.Module, config: dict) -> dict:
    """(width, input map side, stride) -> [one of the model's 3x3 mixers there, how many blocks run one]."""
    sizes = resnet_lambda.stage_input_sizes((32, 32), config["stem"])
    found: dict = {}
    for stage, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        for index, block in enumerate(layer):
            stride = 2 if stage > 0 and index == 0 else 1
            key = (STAGE_WIDTHS[stage], (sizes[stage - 1] if stride == 2 else sizes[stage])[0], stride)
            found.setdefault(key, [block.conv2, 0])[1] += 1
    return found


def mixer_step(mixer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """Forward + backward of one mixer: the gradients of its input and parameters (none accumulated)."""
    def step():
        out = mixer(x)
        torch.autograd.grad(out, [x, *mixer.parameters()], grad, allow_unused=True)
    return step


FLOOR = {"model": "lambda", "lambda_position": "conv"}  # any mode: its lambda layers become identities


def identity_mixer_floor(config: dict) -> nn.Module:
    """The lambda network with every lambda layer an identity (a strided block keeps its average pool)."""
    model = prep.build_model(config)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            if isinstance(block.conv2, nn.Sequential):
                block.conv2[0] = nn.Identity()
            else:
                block.conv2 = nn.Identity()
    return model


def step_kernels(model: nn.Module, args, device: torch.device) -> int:
    """Kernel-launching ops of one training forward + loss + backward (fp32), gradients None first."""
    model.to(device).train()
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, distributed.unwrap(model).fc.out_features, (args.batch_size,), device=device)
    model.zero_grad(set_to_none=True)
    return count_kernels(lambda: F.cross_entropy(model(images), labels).backward())


def benchmark_mixer(mixer: nn.Module, key: tuple, args, device: torch.device,
                    memory_format: torch.memory_format) -> dict:
    """Time (median ms) and kernel count of one mixer's forward + backward at the model batch, its
    input in the run's memory format."""
    width, size, stride = key
    mixer = mixer.to(device).train()
    x = torch.randn(args.batch_size, width, size, size, device=device).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    step = mixer_step(mixer, x, torch.randn_like(mixer(x)))  # the gradient in the output's layout
    result = measure(step, device, args.warmup, args.iters, [])
    return {"ms": 1000 * result["median_s"], "kernels": count_kernels(step)}


def mixer_rows(args, device: torch.device) -> tuple[list[dict], dict]:
    """A row per (width, map size, stride) of the default network: the 3x3 conv and each lambda mode;
    and the kernel-launching ops per training step of each model."""
    rows: dict = {}
    per_step = {}
    for variant in model_variants(args):
        config = model_config(variant, args)
        torch.manual_seed(0)
        model = prep.build_model(config)
        name = "conv" if variant["model"] == "baseline" else f"lambda_{variant['lambda_position']}"
        memory_format = resolve_speed(config, device).memory_format
        per_step[name] = step_kernels(model, args, device)
        for key, (mixer, blocks) in network_mixers(model, config).items():
            row = rows.setdefault(key, {"width": key[0], "size": key[1], "stride": key[2], "blocks": blocks})
            measured = benchmark_mixer(mixer, key, args, device, memory_format)
            row[f"{name}_ms"], row[f"{name}_kernels"] = measured["ms"], measured["kernels"]
            print(f"mixer {key} {name}: {measured['ms']:.2f} ms, {measured['kernels']} kernels", flush=True)
        del model
    per_step["floor"] = step_kernels(identity_mixer_floor(model_config(FLOOR, args)), args, device)
    return list(rows.values()), per_step


def benchmark_mixers(models: list[dict], args, device: torch.device) -> dict:
    """The mixer table, the network totals against the identity-mixer floor, and the kernel counts
    (reported, not targets: issue 21 retired issue 12's kernel budgets)."""
    rows, per_step = mixer_rows(args, device)
    floor = benchmark_model(FLOOR, args, device, build=identity_mixer_floor)
    step_ms = {"conv" if m["model"] == "baseline" else f"lambda_{m['position']}": m["train_step_ms"] for m in models}
    totals = {"floor_step_ms": floor["train_step_ms"], "bound_baseline_over_floor": step_ms["conv"] / floor["train_step_ms"]}
    for name, ms in step_ms.items():
        totals[f"{name}_step_ms"] = ms
        totals[f"{name}_mixers_ms"] = ms - floor["train_step_ms"]  # the network's mixers: step - floor
        totals[f"{name}_mixers_summed_ms"] = sum(row["blocks"] * row[f"{name}_ms"] for row in rows)
    found = {}
    for name in [name for name in step_ms if name != "conv"]:
        for way in ("mixers", "mixers_summed"):
            ratio = totals[f"{name}_{way}_ms"] / totals[f"conv_{way}_ms"]
            found[f"{name}_{way}_over_conv"] = {"value": ratio, "target": 0.5, "met": ratio <= 0.5}
    return {"rows": rows, "totals": totals, "kernels_per_step": per_step, "targets": found}


def mixers_markdown(mixers: dict | None) -> str:
    if not mixers:
        return ""
    names = [name for name in mixers["kernels_per_step"] if name != "floor"]
    lines = ["", "## Mixers (forward + backward at the model batch; kernels: aten ops that launch one)", "",
             "| width | map | stride | blocks | " + " | ".join(f"{n} ms | {n} kernels" for n in names) + " |",
             "|---" * (4 + 2 * len(names)) + "|"]
    for row in mixers["rows"]:
        cells = " | ".join(f"{row[f'{n}_ms']:.2f} | {row[f'{n}_kernels']}" for n in names)
        lines.append(f"| {row['width']} | {row['size']}x{row['size']} | {row['stride']} | {row['blocks']} | {cells} |")
    t = mixers["totals"]
    lines += ["", "| network | train step ms | mixers ms (step - floor) | mixers ms (summed rows) | kernels per step |",
              "|---|---|---|---|---|",
              f"| identity-mixer floor | {t['floor_step_ms']:.1f} | - | - | {mixers['kernels_per_step']['floor']} |"]
    for n in names:
        lines.append(f"| {n} | {t[f'{n}_step_ms']:.1f} | {t[f'{n}_mixers_ms']:.1f} | {t[f'{n}_mixers_summed_ms']:.1f} "
                     f"| {mixers['kernels_per_step'][n]} |")
    lines += ["", f"Bound (baseline / floor): {t['bound_baseline_over_floor']:.2f}x.", "",
              "| mixer target | value | goal | met |", "|---|---|---|---|"]
    for name, target in mixers["targets"].items():
        lines.append(f"| {name} | {target['value']:.2f} | <= {target['target']} | {target['met']} |")
    return "\n".join(lines) + "\n"
