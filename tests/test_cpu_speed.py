"""CPU speed: native-bf16 detection, the layers under CPU autocast, benchmarks/cpu_speed.py."""

from __future__ import annotations

import importlib.util
import platform
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from alexnet.models.layers import CrossChannelLRN, LocallyConnected2d, paper_lrn
from alexnet.train import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists()
                    or platform.machine() not in ("x86_64", "AMD64"),
                    reason="the kernel's CPU flags are read from /proc/cpuinfo on x86 Linux")
def test_native_bf16_detection_agrees_with_the_kernels_cpu_flags():
    flags = cpuinfo_flags()
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


@pytest.mark.parametrize("size", [1, 2, 4, 5, 6])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cross_channel_lrn_is_torchs_lrn(size, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 11, 4, 5, dtype=torch.float64) * 30  # large: the window sum matters
    expected = nn.LocalResponseNorm(size, alpha=1e-3, beta=0.75, k=2.0)(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    got = CrossChannelLRN(size, alpha=1e-3, beta=0.75, k=2.0)(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_lrn_and_locally_connected_layer_compute_in_bf16_under_cpu_autocast():
    torch.manual_seed(0)
    local = LocallyConnected2d(8, 6, 3, input_size=7, padding=1)
    lrn = paper_lrn()
    x = torch.randn(4, 8, 7, 7, requires_grad=True)
    fp32 = local(lrn(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = lrn(x.to(torch.bfloat16))  # as after a conv under autocast
        out = local(normed)
    assert normed.dtype == out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: about 1% of the output's scale
    assert (out.float() - fp32).abs().max() < 0.02 * fp32.abs().max()
    out.float().square().mean().backward()
    assert local.weight.grad.dtype == torch.float32  # the weights and their grads stay fp32
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.fixture
def cpu_speed_module():
    """benchmarks/cpu_speed.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("cpu_speed_benchmark",
                                                  REPO / "benchmarks" / "cpu_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_cpu_speed_benchmark_quick_prints_both_models_and_the_speedup(cpu_speed_module, capsys):
    speedup = cpu_speed_module.main(["--quick"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    table = {(r.split("|")[1].strip(), r.split("|")[2].strip()): r for r in rows[1:]}
    assert set(table) == {(m, a) for m in ("convnet4", "alexnet_cifar")
                          for a in ("defaults", "plain fp32")}
    assert "bf16 autocast" not in table[("convnet4", "plain fp32")]
    assert ("bf16 autocast" in table[("convnet4", "defaults")]) == cpu_has_native_bf16()
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup: \d+\.\dx", last)
    assert speedup > 0 and last == f"speedup: {speedup:.1f}x"
