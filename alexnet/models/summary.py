"""A per-layer table of output shapes and parameter counts (``ablate describe-model``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.table import Table
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str  # dotted module path, e.g. "features.conv1"; "input" for the input row
    kind: str  # the module's class name, e.g. "Conv2d"
    output_shape: tuple[int, ...]  # including the batch dimension
    params: int  # the module's own parameters


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def describe_model(model: nn.Module, input_size: int, batch: int = 1) -> list[LayerRow]:
    """One row per leaf layer, in the order the forward pass runs them, plus the input.

    Shapes come from forward hooks during one dummy forward pass in eval mode (so
    BatchNorm's running statistics and dropout are left alone), not from arithmetic, so
    they are what the model really computes. Identity layers are skipped; every
    parameter belongs to some leaf, so the rows' params add up to ``count_params``.
    """
    rows = [LayerRow("input", "Input", (batch, 3, input_size, input_size), 0)]

    def hook_for(name: str):
        def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(LayerRow(name, type(module).__name__, tuple(output.shape), params))

        return hook

    handles = [
        module.register_forward_hook(hook_for(name))
        for name, module in model.named_modules()
        if not any(module.children()) and not isinstance(module, nn.Identity)
    ]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(batch, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return rows


def render_table(rows: list[LayerRow], total: int) -> Table:
    """A rich Table of ``rows`` (shapes without the batch dimension) and the total."""
    table = Table(title="layers", show_footer=True)
    table.add_column("layer", footer="total")
    table.add_column("kind")
    table.add_column("output (C×H×W)", justify="right")
    table.add_column("params", justify="right", footer=f"{total:,}")
    for row in rows:
        shape = "×".join(str(d) for d in row.output_shape[1:])
        table.add_row(row.name, row.kind, shape, f"{row.params:,}" if row.params else "")
    return table
