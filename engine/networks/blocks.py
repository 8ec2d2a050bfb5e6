"""Building blocks shared by the MediaPipe face-network ports.

Every block knows how to pull its weights out of a `TFLiteGraph` by following the data flow:
`block.load_tflite(graph, t_in) -> t_out`, where t_in is the tflite tensor that feeds the block and
t_out the tensor it produces. Shapes and op options are asserted, so a wrong block order or a
wrong padding mode fails at load time instead of giving subtly wrong numbers.

Forward passes are plain tensor ops with static shapes (no graph interpretation); tensors have
NCHW shapes and the nets keep them in channels-last memory (see `channels_last`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .tflite_weights import TFLiteGraph


def tf_same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) for one axis; the odd pixel goes after."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _set(param: torch.Tensor, value: np.ndarray, what: str) -> None:
    value = np.ascontiguousarray(value, dtype=np.float32)
    if tuple(param.shape) != value.shape:
        raise ValueError(f"{what}: torch shape {tuple(param.shape)} != tflite shape {value.shape}")
    with torch.no_grad():
        param.copy_(torch.tensor(value))


class TFConv2d(nn.Conv2d):
    """Conv2d / depthwise conv with TF padding semantics ('same' or 'valid').

    `in_size` (square input side) is only needed for asymmetric SAME padding (stride > 1);
    symmetric padding is done inside the conv, asymmetric padding with one F.pad.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: str = "same",
                 in_size: int | None = None, depthwise: bool = False, groups: int = 1):
        pad_conv, self.tf_pad = 0, None
        if padding == "same":
            if stride == 1:
                assert k % 2 == 1, "even kernel with stride-1 SAME padding not supported"
                pad_conv = k // 2
            else:
                assert in_size is not None, "stride-2 SAME conv needs in_size"
                b, a = tf_same_pad(in_size, k, stride)
                if b == a:
                    pad_conv = b
                else:
                    self.tf_pad = (b, a, b, a)  # F.pad order: left, right, top, bottom
        super().__init__(cin, cout, k, stride, padding=pad_conv, groups=cin if depthwise else groups, bias=True)
        assert not depthwise or cin == cout
        self.tf_padding = padding.upper()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_pad is not None:
            x = F.pad(x, self.tf_pad)
        return super().forward(x)

    def load_tflite(self, g: TFLiteGraph, t: int, branch: int = 0) -> int:
        if 1 < self.groups < self.in_channels:
            raise TypeError("grouped (parallel) convs load through their per-stream modules")
        kind = "DEPTHWISE_CONV_2D" if self.groups > 1 else "CONV_2D"
        op = g.consumer(t, kind, branch)
        o = op.options
        k = self.kernel_size[0]
        if (o["stride_h"], o["stride_w"]) != self.stride or o["act"] is not None:
            raise ValueError(f"op {op.index}: stride/act {o} do not match {self}")
        # a 1x1 stride-1 conv is indifferent to SAME vs VALID (the detector heads say SAME)
        if o["padding"] != self.tf_padding and not (k == 1 and self.stride == (1, 1)):
            raise ValueError(f"op {op.index}: padding {o['padding']} != {self.tf_padding}")
        w, b = g.weights(op)
        w = w.transpose(3, 0, 1, 2) if kind == "DEPTHWISE_CONV_2D" else w.transpose(0, 3, 1, 2)
        _set(self.weight, w, f"{kind} op {op.index} weight")
        _set(self.bias, b, f"{kind} op {op.index} bias")
        return op.outputs[0]


class PReLU(nn.PReLU):
    def __init__(self, channels: int):
        super().__init__(channels)

    def load_tflite(self, g: TFLiteGraph, t: int) -> int:
        op = g.consumer(t, "PRELU")
        (alpha,) = g.weights(op)
        _set(self.weight, alpha.reshape(-1), f"PRELU op {op.index}")
        return op.outputs[0]


class ReLU(nn.ReLU):
    def load_tflite(self, g: TFLiteGraph, t: int) -> int:
        return g.consumer(t, "RELU").outputs[0]


def make_act(kind: str, channels: int) -> nn.Module:
    return PReLU(channels) if kind == "prelu" else ReLU()


def _check_skip(g: TFLiteGraph, skip_t: int, t_in: int, stride: int, extra_channels: int, where: str) -> None:
    """Walk the skip path of a residual add back to t_in: [MAX_POOL 2x2/2] then [PAD channels]."""
    t = skip_t
    op = g.producer(t)
    if extra_channels:
        if op is None or op.kind != "PAD":
            raise ValueError(f"{where}: expected channel PAD on the skip path, got {op and op.kind}")
        pads = [g.const(i) for i in op.inputs if g.is_const(i)][0]
        if pads.tolist() != [[0, 0], [0, 0], [0, 0], [0, extra_channels]]:
            raise ValueError(f"{where}: unexpected PAD {pads.tolist()}")
        t = g.data_input(op)
        op = g.producer(t)
    if stride == 2:
        if op is None or op.kind != "MAX_POOL_2D" or op.options["filter_h"] != 2 or op.options["stride_h"] != 2:
            raise ValueError(f"{where}: expected 2x2/2 MAX_POOL on the skip path, got {op and op.kind}")
        t = g.data_input(op)
    if t != t_in:
        raise ValueError(f"{where}: skip path does not start at the block input")


def _skip(x: torch.Tensor, stride: int, extra: int) -> torch.Tensor:
    if stride == 2:
        x = F.max_pool2d(x, 2, 2)
    if extra:
        x = F.pad(x, (0, 0, 0, 0, 0, extra))
    return x


class BlazeBlock(nn.Module):
    """act( pw1x1(dw3x3/s(x)) + pad_channels(maxpool(x) if s == 2 else x) )."""

    def __init__(self, cin: int, cout: int, stride: int = 1, in_size: int | None = None, act: str = "prelu"):
        super().__init__()
        self.stride, self.extra = stride, cout - cin
        assert self.extra >= 0
        self.dw = TFConv2d(cin, cin, 3, stride, "same", in_size, depthwise=True)
        self.pw = TFConv2d(cin, cout, 1, padding="valid")
        self.act = make_act(act, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pw(self.dw(x)) + _skip(x, self.stride, self.extra))

    def load_tflite(self, g: TFLiteGraph, t: int, branch: int = 0) -> int:
        h = self.pw.load_tflite(g, self.dw.load_tflite(g, t, branch))
        add = g.consumer(h, "ADD")
        other = [i for i in add.inputs if i != h][0]
        _check_skip(g, other, t, self.stride, self.extra, f"BlazeBlock at ADD op {add.index}")
        return self.act.load_tflite(g, add.outputs[0])


class ConvAct(nn.Module):
    """conv (any kernel) followed by PReLU/ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: str = "same",
                 in_size: int | None = None, act: str = "prelu"):
        super().__init__()
        self.conv = TFConv2d(cin, cout, k, stride, padding, in_size)
        self.act = make_act(act, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    def load_tflite(self, g: TFLiteGraph, t: int, branch: int = 0) -> int:
        return self.act.load_tflite(g, self.conv.load_tflite(g, t, branch))


class Sequential(nn.Sequential):
    """nn.Sequential whose load_tflite chains its children; `branch` picks the first child's op."""

    def load_tflite(self, g: TFLiteGraph, t: int, branch: int = 0) -> int:
        for i, m in enumerate(self):
            t = m.load_tflite(g, t, branch) if i == 0 else m.load_tflite(g, t)
        return t


class ResBottleneck(nn.Module):
    """Iris-model residual block r(c, m): act( pw(m->c)(dw3x3(prelu(pw(c->m)(x)))) + x )."""

    def __init__(self, c: int, m: int):
        super().__init__()
        self.reduce = ConvAct(c, m, 1, padding="valid")
        self.dw = TFConv2d(m, m, 3, 1, "same", depthwise=True)
        self.expand = TFConv2d(m, c, 1, padding="valid")
        self.act = PReLU(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.expand(self.dw(self.reduce(x))) + x)

    def load_tflite(self, g: TFLiteGraph, t: int, branch: int = 0) -> int:
        h = self.expand.load_tflite(g, self.dw.load_tflite(g, self.reduce.load_tflite(g, t, branch)))
        add = g.consumer(h, "ADD")
        if t not in add.inputs:
            raise ValueError(f"ResBottleneck: ADD op {add.index} does not add the block input")
        return self.act.load_tflite(g, add.outputs[0])


class DownBottleneck(nn.Module):
    """Iris-model down block d(cin->cout; m): conv 2x2/2 VALID + PReLU -> dw3x3 -> pw(m->cout),
    plus maxpool(+zero channels) skip, then PReLU."""

    def __init__(self, cin: int, cout: int, m: int):
        super().__init__()
        self.extra = cout - cin
        self.reduce = ConvAct(cin, m, 2, 2, padding="valid")
        self.dw = TFConv2d(m, m, 3, 1, "same", depthwise=True)
        self.expand = TFConv2d(m, cout, 1, padding="valid")
        self.act = PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.expand(self.dw(self.reduce(x))) + _skip(x, 2, self.extra))

    def load_tflite(self, g: TFLiteGraph, t: int, branch: int = 0) -> int:
        h = self.expand.load_tflite(g, self.dw.load_tflite(g, self.reduce.load_tflite(g, t, branch)))
        add = g.consumer(h, "ADD")
        other = [i for i in add.inputs if i != h][0]
        _check_skip(g, other, t, 2, self.extra, f"DownBottleneck at ADD op {add.index}")
        return self.act.load_tflite(g, add.outputs[0])


# ---------------------------------------------------------------- parallel streams
# The attention model runs 3 region streams and then 5 output streams with identical layer shapes but
# separate weights. Running n such streams as one grouped block (channels concatenated, depthwise
# convs over all channels, 1x1 convs with groups=n) is the same arithmetic with n times fewer ops,
# which matters on CPU where these 4x4 / 2x2 tensors are dominated by per-op overhead.

def _merge_into(dst: nn.Module, srcs: list[nn.Module]) -> None:
    """Copy the parameters of n per-stream modules into the grouped module (concatenated on dim 0)."""
    params = [dict(m.named_parameters()) for m in srcs]
    for name, p in dst.named_parameters():
        _set(p, torch.cat([q[name].detach() for q in params]).numpy(), f"parallel {name}")


class ParallelBlazeBlock(nn.Module):
    """n BlazeBlock(cin->cout, s) on channel-concatenated streams: [B, n*cin, H, W] -> [B, n*cout, H/s, W/s]."""

    def __init__(self, n: int, cin: int, cout: int, stride: int = 1, in_size: int | None = None, act: str = "prelu"):
        super().__init__()
        self.n, self.cin, self.cout, self.stride, self.act_kind, self.in_size = n, cin, cout, stride, act, in_size
        self.dw = TFConv2d(n * cin, n * cin, 3, stride, "same", in_size, depthwise=True)
        self.pw = TFConv2d(n * cin, n * cout, 1, padding="valid", groups=n)
        self.act = make_act(act, n * cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.max_pool2d(x, 2, 2) if self.stride == 2 else x
        if self.cout > self.cin:  # zero channels appended per stream
            b, _, h, w = skip.shape
            skip = F.pad(skip.reshape(b, self.n, self.cin, h, w), (0, 0, 0, 0, 0, self.cout - self.cin))
            skip = skip.reshape(b, self.n * self.cout, h, w)
        return self.act(self.pw(self.dw(x)) + skip)

    def load_tflite(self, g: TFLiteGraph, ts: list[int], branches: list[int]) -> list[int]:
        blocks = [BlazeBlock(self.cin, self.cout, self.stride, self.in_size, self.act_kind) for _ in range(self.n)]
        outs = [b.load_tflite(g, t, br) for b, t, br in zip(blocks, ts, branches, strict=True)]
        _merge_into(self, blocks)
        return outs


class ParallelConvAct(nn.Module):
    """n (conv k x k / stride VALID, cin->cout, + PReLU) on channel-concatenated streams."""

    def __init__(self, n: int, cin: int, cout: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.n, self.cin, self.cout, self.k, self.stride = n, cin, cout, k, stride
        self.conv = TFConv2d(n * cin, n * cout, k, stride, padding="valid", groups=n)
        self.act = PReLU(n * cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    def load_tflite(self, g: TFLiteGraph, ts: list[int], branches: list[int]) -> list[int]:
        mods = [ConvAct(self.cin, self.cout, self.k, self.stride, padding="valid") for _ in range(self.n)]
        outs = [m.load_tflite(g, t, br) for m, t, br in zip(mods, ts, branches, strict=True)]
        _merge_into(self, mods)
        return outs


class ParallelResBottleneck(nn.Module):
    """n ResBottleneck(c, m) on channel-concatenated streams."""

    def __init__(self, n: int, c: int, m: int):
        super().__init__()
        self.n, self.c, self.m = n, c, m
        self.reduce = ParallelConvAct(n, c, m)
        self.dw = TFConv2d(n * m, n * m, 3, 1, "same", depthwise=True)
        self.expand = TFConv2d(n * m, n * c, 1, padding="valid", groups=n)
        self.act = PReLU(n * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.expand(self.dw(self.reduce(x))) + x)

    def load_tflite(self, g: TFLiteGraph, ts: list[int], branches: list[int]) -> list[int]:
        mods = [ResBottleneck(self.c, self.m) for _ in range(self.n)]
        outs = [b.load_tflite(g, t, br) for b, t, br in zip(mods, ts, branches, strict=True)]
        _merge_into(self, mods)
        return outs


class ParallelDownBottleneck(nn.Module):
    """n DownBottleneck(c -> c; m) on channel-concatenated streams (no channel growth)."""

    def __init__(self, n: int, c: int, m: int):
        super().__init__()
        self.n, self.c, self.m = n, c, m
        self.reduce = ParallelConvAct(n, c, m, 2, 2)
        self.dw = TFConv2d(n * m, n * m, 3, 1, "same", depthwise=True)
        self.expand = TFConv2d(n * m, n * c, 1, padding="valid", groups=n)
        self.act = PReLU(n * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.expand(self.dw(self.reduce(x))) + F.max_pool2d(x, 2, 2))

    def load_tflite(self, g: TFLiteGraph, ts: list[int], branches: list[int]) -> list[int]:
        mods = [DownBottleneck(self.c, self.c, self.m) for _ in range(self.n)]
        outs = [b.load_tflite(g, t, br) for b, t, br in zip(mods, ts, branches, strict=True)]
        _merge_into(self, mods)
        return outs


class ParallelSequential(nn.Sequential):
    def load_tflite(self, g: TFLiteGraph, ts: list[int], branches: list[int]) -> list[int]:
        for i, m in enumerate(self):
            ts = m.load_tflite(g, ts, branches if i == 0 else [0] * len(ts))
        return ts


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The ports run in channels-last memory layout (NCHW shapes): on CPU this is ~4x faster than
    contiguous NCHW for these depthwise-heavy nets (oneDNN kernels, cheap 2x2 max-pools)."""
    return x.contiguous(memory_format=torch.channels_last)


def finalize(net: nn.Module) -> nn.Module:
    """Eval mode, no grads, channels-last weights."""
    net = net.to(memory_format=torch.channels_last).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def blaze_stage(cin: int, cout: int, n_extra: int, stride: int, in_size: int, act: str) -> list[nn.Module]:
    """One B(cin->cout, s) then n_extra B(cout->cout)."""
    out_size = in_size // stride
    return [BlazeBlock(cin, cout, stride, in_size, act)] + [BlazeBlock(cout, cout, 1, out_size, act)
                                                             for _ in range(n_extra)]
