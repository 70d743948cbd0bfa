"""Small factories for tests (importable as ``models:<name>`` with tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp():
    torch.manual_seed(0)
    return MLP().eval(), {"x": torch.randn(2, 8)}, {"x": {0: "batch"}}


def mlp_fixed():
    """Same MLP, no dynamic dims: shapes are fixed at batch 2."""
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(2, 8),)


@torch.library.custom_op("adapter_tests::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("adapter_tests::enigma", mutates_args=())
def enigma(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@enigma.register_fake
def _(x):
    return torch.empty_like(x)


class Odd(nn.Module):
    def forward(self, x):
        return enigma(x)


class CustomOps(nn.Module):
    """Two torch ops with no ONNX translation, in two different modules."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.odd = Odd()

    def forward(self, x):
        return self.odd(mystery(self.proj(x)))


def custom_ops():
    return CustomOps().eval(), {"x": torch.randn(2, 4)}


class DataDependent(nn.Module):
    def forward(self, x):
        return x[x > 0].sum().reshape(1) * torch.ones(int(x.abs().sum().item()))


def data_dependent():
    return DataDependent().eval(), {"x": torch.randn(2, 4)}


def not_a_tuple():
    return MLP()


def raises():
    raise RuntimeError("weights file is corrupt")


NOT_CALLABLE = 42


class Overflow(nn.Module):
    """An activation far beyond FP16's range (|x| > 1e5), normalised right after."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loud = self.fc1(x) * 1e6
        return self.fc2(self.norm(loud))


def overflow():
    torch.manual_seed(0)
    return Overflow().eval(), {"x": torch.randn(2, 8)}, {"x": {0: "batch"}}


class Sensitive(nn.Module):
    """Four linear layers; the third reads an input with one channel scaled by 1000 (and
    weighted down by 1000, so FP32 barely notices it). Per-tensor INT8 of that input must
    cover +-1000, which rounds every other channel to zero: INT8 ruins this layer alone,
    and no layer amplifies another's rounding."""

    def __init__(self, outlier: float = 1000.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))
        gain = torch.ones(32)
        gain[0] = outlier
        self.register_buffer("gain", gain)
        with torch.no_grad():
            self.layers[2].weight[:, 0] /= outlier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x * self.gain if i == 2 else x))
        return x


def sensitive():
    torch.manual_seed(0)
    return Sensitive().eval(), {"x": torch.randn(2, 32)}, {"x": {0: "batch"}}


def calm():
    """The same four layers with no outlier channel."""
    torch.manual_seed(0)
    return Sensitive(outlier=1.0).eval(), {"x": torch.randn(2, 32)}, {"x": {0: "batch"}}


class Determinant(nn.Module):
    """A linear layer, then a 3x3 determinant per row: ONNX ``Det``, which ONNX Runtime
    runs and OpenVINO 2026.4's ONNX frontend does not convert."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(9, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.det(self.fc(x).reshape(-1, 3, 3)).unsqueeze(-1) + x.sum(-1, keepdim=True)


def determinant():
    torch.manual_seed(0)
    return Determinant().eval(), {"x": torch.randn(2, 9)}, {"x": {0: "batch"}}


class Saturating(nn.Module):
    """sigmoid(x) -- all positive, so INT8 dynamic maps it to u8 values up to 255 -- into a
    Linear with positive weights (near +127 once quantized): the u8 x s8 pair sums pass
    the 16-bit range of kernels without VNNI. Then a Linear on centred values."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Linear(64, 16)
        self.quiet = nn.Linear(16, 8)
        with torch.no_grad():
            self.loud.weight.uniform_(0.6, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        loud = self.loud(torch.sigmoid(x))
        return self.quiet(torch.tanh(loud - loud.mean(-1, keepdim=True)))


def saturating():
    torch.manual_seed(0)
    return Saturating().eval(), {"x": torch.randn(2, 4, 64)}, {"x": {0: "batch"}}


class MeanEmbed(nn.Module):
    """A sentence-embedding stand-in: token embeddings, a layer, masked mean over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32000, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        tokens = torch.tanh(self.fc(self.embed(input_ids)))
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def mean_embed():
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (2, 12))
    dims = {0: "batch", 1: "sequence"}
    return MeanEmbed().eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, \
        {"input_ids": dims, "attention_mask": dims}
