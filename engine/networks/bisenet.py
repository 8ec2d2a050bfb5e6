"""BiSeNetV2 face parser (CelebAMask-HQ, 19 classes), ported from its int8 TFLite graph.

Asset: ``faceparse/bisenetv2_celebamaskhq_448x448_integer_quant.tflite`` (README beside it: MIT code,
non-commercial training data, so an optional engine). Input [B,3,448,448] RGB in [-1, 1]
(pixel / 127.5 - 1); output logits [B,19,448,448]; the graph's own output is their argmax.

The weights are int8 with per-channel scales (biases int32 with scale = input scale x weight scale):
`QuantGraph` dequantises every constant, so the torch module is a plain float network. In the int8
graph every activation is also quantised; the port reproduces each op's int8 *range* (a clamp to
[(-128 - zp) s, (127 - zp) s], where a calibration range saturates) but not the rounding.

Measured against ai-edge-litert on 8 real faces (the shared media, parser crops as in
engine.segmentation): 99.48 % of the 448x448 class-map pixels equal (99.09-99.65 % per face); per-class
IoU 0.93-0.99 over the 8 faces; with the l_/r_ classes merged (what the segmentation engine uses),
face-class IoU >= 0.91 on every face. The range clamps change these figures by < 0.01 % and cost
nothing measurable, so they stay on (`set_range_emulation(False)` gives the pure float net).
Speed, 2-core CPU, 2 threads: ~57 ms per 448 crop (torch) vs ~19 ms for LiteRT's int8 XNNPACK path;
NVIDIA H200 (torch 2.11, fp32/TF32): 4.8 ms at batch 1, 0.32 ms per face at batch 32; CUDA vs CPU
class maps 99.98 % equal with TF32, 100 % without.

Layer table (op indices of the shipped file, tensors NHWC there, NCHW here):

* detail branch (ops 1-8): conv3x3 s2/s1 (3->64->64), s2/s1/s1 (64), s2/s1/s1 (64->128->128), ReLU
  after all but the last -> 56x56x128;
* semantic branch: stem (13-19): conv3x3 s2 3->16 ReLU, then [conv1x1 16->8 ReLU, conv3x3 s2 8->16
  ReLU] || maxpool 3x3 s2, concat, conv3x3 32->16 ReLU -> 112x112x16; gather-expand blocks
  GE(16->32, s2), GE(32), GE(32->64, s2), GE(64), GE(64->128, s2), 3x GE(128) -> 14x14x128;
  context embedding (61-66): global mean, BN (mul + add), conv1x1 ReLU, broadcast add, conv3x3;
* guided aggregation (9-12, 67-77): detail -> dw3x3, conv1x1 (56) and conv3x3 s2, avgpool 3x3 s2 (14);
  semantic -> conv3x3, resize x4, sigmoid (56) and dw3x3, conv1x1, sigmoid (14); the two products are
  summed at 56 (the 14-px one resized x4) -> conv3x3 ReLU;
* head (78-80): conv3x3 128->256 ReLU, conv1x1 256->19, bilinear resize x8 to 448.

Resizes use TF's legacy bilinear convention (align_corners = half_pixel_centers = False, read from
the graph), done as two small interpolation matrices. Forward passes are plain tensor ops.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import TFConv2d, _set, channels_last, finalize, tf_same_pad
from .tflite_weights import Op, TFLiteGraph, _read_options

ASSET = "faceparse/bisenetv2_celebamaskhq_448x448_integer_quant.tflite"
INPUT_SIZE = 448
N_CLASSES = 19


# ---------------------------------------------------------------- graph with quantisation

class QuantGraph(TFLiteGraph):
    """`TFLiteGraph` that dequantises constants ((q - zero_point) x scale, per channel along the
    tensor's quantized dimension) and knows every int8 activation's representable range."""

    def __init__(self, path: str | Path):
        import tflite

        super().__init__(path)
        model = tflite.Model.GetRootAsModel(self._buf, 0)
        g = model.Subgraphs(0)
        self._fb_ops = [g.Operators(k) for k in range(g.OperatorsLength())]
        self.types = [g.Tensors(i).Type() for i in range(g.TensorsLength())]
        self.quant: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        for i in range(g.TensorsLength()):
            q = g.Tensors(i).Quantization()
            if q is not None and q.ScaleLength() > 0:
                self.quant[i] = (q.ScaleAsNumpy().astype(np.float64), q.ZeroPointAsNumpy().astype(np.float64),
                                 int(q.QuantizedDimension()))

    def const(self, t: int) -> np.ndarray:
        arr = super().const(t)
        if t not in self.quant or arr.dtype.kind not in "iu":
            return arr
        scale, zp, dim = self.quant[t]
        shape = [1] * arr.ndim
        if len(scale) > 1:
            shape[dim] = len(scale)
        return ((arr.astype(np.float64) - zp.reshape(shape)) * scale.reshape(shape)).astype(np.float32)

    def act_range(self, t: int) -> tuple[float, float] | None:
        """Float range of an int8/uint8 activation tensor, None for float tensors."""
        if t not in self.quant or self.types[t] not in (3, 9):  # UINT8, INT8
            return None
        scale, zp, _ = self.quant[t]
        lo, hi = (0, 255) if self.types[t] == 3 else (-128, 127)
        return float((lo - zp[0]) * scale[0]), float((hi - zp[0]) * scale[0])

    def read_options(self, op: Op, cls_name: str, fields: dict) -> dict:
        return _read_options(self._fb_ops[op.index], cls_name, fields)

    def only_consumer(self, t: int, kind: str) -> Op:
        ops = self.consumers(t, kind)
        if len(ops) != 1:
            raise ValueError(f"{self.path.name}: expected one {kind} reading tensor {t}, found {len(ops)}")
        return ops[0]


def _through_quantize(g: QuantGraph, t: int) -> int:
    """Follow an int8 -> int8 QUANTIZE (a rescale; the identity in float) if t feeds one."""
    q = g.consumers(t, "QUANTIZE")
    return q[0].outputs[0] if q else t


# ---------------------------------------------------------------- layers

class RangeClamp(nn.Module):
    """The int8 output range of a graph op (and its fused ReLU): clamp(x, lo, hi); off -> identity
    (or a plain ReLU when the op had one)."""

    def __init__(self, relu: bool = False):
        super().__init__()
        self.relu = relu
        self.lo: float | None = 0.0 if relu else None
        self.hi: float | None = None
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and (self.lo is not None or self.hi is not None):
            return x.clamp(self.lo, self.hi)
        return F.relu(x) if self.relu else x

    def set_range(self, g: QuantGraph, t: int) -> int:
        r = g.act_range(t)
        if r is not None:
            self.lo, self.hi = (max(r[0], 0.0) if self.relu else r[0]), r[1]
        return t


class QConv(nn.Module):
    """Conv (dense, or depthwise with any depth multiplier) with TF SAME padding, optional fused ReLU
    and the output's int8 range."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, in_size: int | None = None,
                 depthwise: bool = False, relu: bool = False):
        super().__init__()
        self.depthwise, self.relu = depthwise, relu
        self.conv = TFConv2d(cin, cout, k, stride, "same", in_size, groups=cin if depthwise else 1)
        self.out = RangeClamp(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x))

    def load_tflite(self, g: QuantGraph, t: int, branch: int = 0) -> int:
        kind = "DEPTHWISE_CONV_2D" if self.depthwise else "CONV_2D"
        op = g.consumer(t, kind, branch)
        o, c = op.options, self.conv
        if (o["stride_h"], o["stride_w"]) != c.stride or o["act"] != ("RELU" if self.relu else None):
            raise ValueError(f"op {op.index}: stride/act {o} do not match {self}")
        if o["padding"] != "SAME" and not (c.kernel_size[0] == 1 and c.stride == (1, 1)):
            raise ValueError(f"op {op.index}: padding {o['padding']} != SAME")
        w, b = g.weights(op)
        w = w.transpose(3, 0, 1, 2) if self.depthwise else w.transpose(0, 3, 1, 2)
        _set(c.weight, w, f"{kind} op {op.index} weight")
        _set(c.bias, b, f"{kind} op {op.index} bias")
        return self.out.set_range(g, op.outputs[0])


class TFResizeBilinear(nn.Module):
    """TF RESIZE_BILINEAR (any of its three coordinate conventions) as out = Ay @ x @ Ax^T."""

    def __init__(self, in_size: int, out_size: int, align_corners: bool = False, half_pixel: bool = False):
        super().__init__()
        self.in_size, self.out_size = in_size, out_size
        self.register_buffer("ay", self.matrix(in_size, out_size, align_corners, half_pixel), persistent=False)
        self.register_buffer("axt", self.ay.T.contiguous(), persistent=False)
        self.out = RangeClamp()

    @staticmethod
    def matrix(n_in: int, n_out: int, align_corners: bool, half_pixel: bool) -> torch.Tensor:
        d = np.arange(n_out, dtype=np.float64)
        if align_corners and n_out > 1:
            src = d * ((n_in - 1) / (n_out - 1))
        elif half_pixel:
            src = np.maximum((d + 0.5) * (n_in / n_out) - 0.5, 0.0)
        else:
            src = d * (n_in / n_out)
        lo = np.floor(src)
        frac = src - lo
        i0 = np.clip(lo, 0, n_in - 1).astype(np.int64)
        i1 = np.clip(lo + 1, 0, n_in - 1).astype(np.int64)
        a = np.zeros((n_out, n_in))
        np.add.at(a, (np.arange(n_out), i0), 1.0 - frac)
        np.add.at(a, (np.arange(n_out), i1), frac)
        return torch.tensor(a, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.matmul(torch.matmul(self.ay, x), self.axt))

    def load_tflite(self, g: QuantGraph, t: int) -> int:
        op = g.only_consumer(t, "RESIZE_BILINEAR")
        opts = g.read_options(op, "ResizeBilinearOptions", {"align": "AlignCorners", "half": "HalfPixelCenters"})
        size = g.const(op.inputs[1]).tolist()
        if size != [self.out_size] * 2 or g.shapes[t][1] != self.in_size:
            raise ValueError(f"op {op.index}: resize {g.shapes[t][1]}->{size} != {self.in_size}->{self.out_size}")
        self.ay = self.matrix(self.in_size, self.out_size, bool(opts["align"]), bool(opts["half"]))
        self.axt = self.ay.T.contiguous()
        return self.out.set_range(g, op.outputs[0])


class DetailBranch(nn.Module):
    """Three stages of plain 3x3 convs: 448 -> 56 px, 3 -> 64 -> 64 -> 128 channels."""

    def __init__(self, size: int = INPUT_SIZE):
        super().__init__()
        s = size
        self.convs = nn.ModuleList([
            QConv(3, 64, 3, 2, s, relu=True), QConv(64, 64, 3, relu=True),
            QConv(64, 64, 3, 2, s // 2, relu=True), QConv(64, 64, 3, relu=True), QConv(64, 64, 3, relu=True),
            QConv(64, 128, 3, 2, s // 4, relu=True), QConv(128, 128, 3, relu=True), QConv(128, 128, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c in self.convs:
            x = c(x)
        return x

    def load_tflite(self, g: QuantGraph, t: int) -> int:
        for c in self.convs:
            t = c.load_tflite(g, t, branch=0)  # the input feeds detail (first) and semantic convs
        return t


class StemBlock(nn.Module):
    """conv3x3/2 ReLU, then [conv1x1 ReLU -> conv3x3/2 ReLU] || maxpool 3x3/2 SAME, concat, conv3x3 ReLU."""

    def __init__(self, size: int = INPUT_SIZE):
        super().__init__()
        self.conv = QConv(3, 16, 3, 2, size, relu=True)
        self.left1 = QConv(16, 8, 1, relu=True)
        self.left2 = QConv(8, 16, 3, 2, size // 2, relu=True)
        self.pool_pad = tf_same_pad(size // 2, 3, 2)
        self.fuse = QConv(32, 16, 3, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        b, a = self.pool_pad
        right = F.max_pool2d(F.pad(x, (b, a, b, a), value=float("-inf")), 3, 2)
        return self.fuse(torch.cat([self.left2(self.left1(x)), right], dim=1))

    def load_tflite(self, g: QuantGraph, t: int) -> int:
        t = self.conv.load_tflite(g, t, branch=1)
        left = self.left2.load_tflite(g, self.left1.load_tflite(g, t))
        pool = g.only_consumer(t, "MAX_POOL_2D")
        po = pool.options
        if (po["filter_h"], po["stride_h"], po["padding"]) != (3, 2, "SAME"):
            raise ValueError(f"op {pool.index}: unexpected max pool {po}")
        right = _through_quantize(g, pool.outputs[0])
        cat = g.only_consumer(left, "CONCATENATION")
        if list(cat.inputs) != [left, right] or cat.options["axis"] not in (-1, 3):
            raise ValueError(f"op {cat.index}: concat inputs {cat.inputs} != {[left, right]}")
        return self.fuse.load_tflite(g, cat.outputs[0])


class GatherExpand(nn.Module):
    """GE block. stride 1: relu(x + pw(dw_x6(conv3x3 relu(x)))). stride 2: conv3x3 relu, dw3x3/2 x6,
    dw3x3, pw; shortcut dw3x3/2, pw; relu of the sum."""

    def __init__(self, cin: int, cout: int, stride: int, in_size: int, expand: int = 6):
        super().__init__()
        self.stride = stride
        m = cin * expand
        self.conv = QConv(cin, cin, 3, relu=True)
        self.dw = QConv(cin, m, 3, stride, in_size, depthwise=True)
        self.dw2 = QConv(m, m, 3, depthwise=True) if stride == 2 else None
        self.pw = QConv(m, cout, 1)
        if stride == 2:
            self.short_dw = QConv(cin, cin, 3, 2, in_size, depthwise=True)
            self.short_pw = QConv(cin, cout, 1)
        else:
            assert cin == cout
        self.out = RangeClamp(relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.conv(x))
        if self.dw2 is not None:
            h = self.dw2(h)
        h = self.pw(h)
        skip = self.short_pw(self.short_dw(x)) if self.stride == 2 else x
        return self.out(h + skip)

    def load_tflite(self, g: QuantGraph, t: int) -> int:
        h = self.dw.load_tflite(g, self.conv.load_tflite(g, t))
        if self.dw2 is not None:
            h = self.dw2.load_tflite(g, h)
        h = self.pw.load_tflite(g, h)
        skip = self.short_pw.load_tflite(g, self.short_dw.load_tflite(g, t)) if self.stride == 2 else t
        add = g.only_consumer(h, "ADD")
        if sorted(add.inputs) != sorted([h, skip]) or add.options["act"] != "RELU":
            raise ValueError(f"GE block: ADD op {add.index} inputs {add.inputs} / act {add.options}")
        return self.out.set_range(g, add.outputs[0])


class ContextEmbedding(nn.Module):
    """x + relu(conv1x1(bn(mean_hw(x)))), then conv3x3."""

    def __init__(self, c: int = 128):
        super().__init__()
        self.register_buffer("bn_scale", torch.ones(1, c, 1, 1))
        self.register_buffer("bn_shift", torch.zeros(1, c, 1, 1))
        self.mean_out, self.scale_out, self.shift_out = RangeClamp(), RangeClamp(), RangeClamp()
        self.pw = QConv(c, c, 1, relu=True)
        self.add_out = RangeClamp()
        self.conv = QConv(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mean_out(x.mean(dim=(2, 3), keepdim=True))
        m = self.shift_out(self.scale_out(m * self.bn_scale) + self.bn_shift)
        return self.conv(self.add_out(self.pw(m) + x))

    def load_tflite(self, g: QuantGraph, t: int) -> int:
        mean = g.only_consumer(t, "MEAN")
        if sorted(int(a) % 4 for a in g.const(mean.inputs[1]).ravel()) != [1, 2]:
            raise ValueError(f"op {mean.index}: MEAN is not over H, W")
        m = self.mean_out.set_range(g, mean.outputs[0])
        mul = g.only_consumer(m, "MUL")
        _set(self.bn_scale, g.weights(mul)[0].reshape(1, -1, 1, 1), f"MUL op {mul.index}")
        m = self.scale_out.set_range(g, mul.outputs[0])
        add = g.only_consumer(m, "ADD")
        _set(self.bn_shift, g.weights(add)[0].reshape(1, -1, 1, 1), f"ADD op {add.index}")
        m = self.shift_out.set_range(g, add.outputs[0])
        m = self.pw.load_tflite(g, m)
        add2 = g.only_consumer(m, "ADD")
        if sorted(add2.inputs) != sorted([m, t]):
            raise ValueError(f"CE block: ADD op {add2.index} does not add the block input")
        return self.conv.load_tflite(g, self.add_out.set_range(g, add2.outputs[0]))


class GuidedAggregation(nn.Module):
    """BGA: detail x sigmoid(up(semantic)) + up(avgpool(detail) x sigmoid(semantic)), conv3x3 ReLU."""

    def __init__(self, c: int = 128, size: int = 56):
        super().__init__()
        small = size // 4
        self.d_dw = QConv(c, c, 3, depthwise=True)
        self.d_pw = QConv(c, c, 1)
        self.d_down = QConv(c, c, 3, 2, size)
        self.pool_pad = tf_same_pad(size // 2, 3, 2)
        n = size // 2 + sum(self.pool_pad)
        ones = F.pad(torch.ones(1, 1, size // 2, size // 2), (self.pool_pad[0], self.pool_pad[1]) * 2)
        # TF SAME average pooling divides by the number of real (unpadded) pixels in each window
        self.register_buffer("pool_norm", 1.0 / F.avg_pool2d(ones, 3, 2), persistent=False)
        assert (n - 3) // 2 + 1 == small
        self.pool_out = RangeClamp()
        self.s_conv = QConv(c, c, 3)
        self.s_up = TFResizeBilinear(small, size)
        self.s_sig = RangeClamp()
        self.s_dw = QConv(c, c, 3, depthwise=True)
        self.s_pw = QConv(c, c, 1)
        self.s_sig2 = RangeClamp()
        self.mul_a, self.mul_b, self.add_out = RangeClamp(), RangeClamp(), RangeClamp()
        self.up_b = TFResizeBilinear(small, size)
        self.fuse = QConv(c, c, 3, relu=True)

    def forward(self, detail: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        d_a = self.d_pw(self.d_dw(detail))
        b, a = self.pool_pad
        d_b = self.pool_out(F.avg_pool2d(F.pad(self.d_down(detail), (b, a, b, a)), 3, 2) * self.pool_norm)
        s_a = self.s_sig(torch.sigmoid(self.s_up(self.s_conv(semantic))))
        s_b = self.s_sig2(torch.sigmoid(self.s_pw(self.s_dw(semantic))))
        x = self.mul_a(d_a * s_a) + self.up_b(self.mul_b(d_b * s_b))
        return self.fuse(self.add_out(x))

    def load_tflite(self, g: QuantGraph, t_detail: int, t_sem: int) -> int:
        d_b = self.d_down.load_tflite(g, t_detail, branch=0)
        pool = g.only_consumer(d_b, "AVERAGE_POOL_2D")
        po = g.read_options(pool, "Pool2DOptions", {"pad": "Padding", "s": "StrideH", "f": "FilterHeight",
                                                    "act": "FusedActivationFunction"})
        if (po["pad"], po["s"], po["f"], po["act"]) != (0, 2, 3, None):  # 0 = SAME
            raise ValueError(f"op {pool.index}: unexpected average pool {po}")
        d_b = self.pool_out.set_range(g, pool.outputs[0])
        d_a = self.d_pw.load_tflite(g, self.d_dw.load_tflite(g, t_detail))
        s_a = self.s_up.load_tflite(g, self.s_conv.load_tflite(g, t_sem, branch=0))
        sig_a = g.only_consumer(s_a, "LOGISTIC")
        s_a = self.s_sig.set_range(g, sig_a.outputs[0])
        s_b = self.s_pw.load_tflite(g, self.s_dw.load_tflite(g, t_sem))
        sig_b = g.only_consumer(s_b, "LOGISTIC")
        s_b = self.s_sig2.set_range(g, sig_b.outputs[0])
        mul_a, mul_b = g.only_consumer(s_a, "MUL"), g.only_consumer(s_b, "MUL")
        if sorted(mul_a.inputs) != sorted([d_a, s_a]) or sorted(mul_b.inputs) != sorted([d_b, s_b]):
            raise ValueError("BGA: products do not pair detail and semantic paths as expected")
        a = self.mul_a.set_range(g, mul_a.outputs[0])
        b = self.up_b.load_tflite(g, self.mul_b.set_range(g, mul_b.outputs[0]))
        add = g.only_consumer(a, "ADD")
        if sorted(add.inputs) != sorted([a, b]):
            raise ValueError(f"BGA: ADD op {add.index} inputs {add.inputs}")
        return self.fuse.load_tflite(g, self.add_out.set_range(g, add.outputs[0]))


# ---------------------------------------------------------------- the network

class BiSeNetV2(nn.Module):
    """forward(x [B,3,N,N] RGB in [-1, 1]) -> logits [B,19,N,N] (N = 448 for the shipped file).
    `forward_lowres` stops before the final x8 resize ([B,19,N/8,N/8])."""

    def __init__(self, input_size: int = INPUT_SIZE, n_classes: int = N_CLASSES):
        super().__init__()
        s = input_size
        self.input_size, self.n_classes = s, n_classes
        self.source_name, self.source_path = "unloaded", None
        self.detail = DetailBranch(s)
        self.stem = StemBlock(s)
        self.ge = nn.ModuleList([
            GatherExpand(16, 32, 2, s // 4), GatherExpand(32, 32, 1, s // 8),
            GatherExpand(32, 64, 2, s // 8), GatherExpand(64, 64, 1, s // 16),
            GatherExpand(64, 128, 2, s // 16), *[GatherExpand(128, 128, 1, s // 32) for _ in range(3)]])
        self.context = ContextEmbedding(128)
        self.aggregate = GuidedAggregation(128, s // 8)
        self.head = QConv(128, 256, 3, relu=True)
        self.classifier = QConv(256, n_classes, 1)
        self.upsample = TFResizeBilinear(s // 8, s)

    def forward_lowres(self, x: torch.Tensor) -> torch.Tensor:
        x = channels_last(x)
        d = self.detail(x)
        s = self.stem(x)
        for blk in self.ge:
            s = blk(s)
        s = self.context(s)
        return self.classifier(self.head(self.aggregate(d, s)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.forward_lowres(x).contiguous())

    def set_range_emulation(self, enabled: bool) -> None:
        """Clamp activations to the int8 graph's ranges (default on) or run the pure float net."""
        for m in self.modules():
            if isinstance(m, RangeClamp):
                m.enabled = enabled

    def load_tflite(self, g: QuantGraph) -> None:
        (t_in,) = g.inputs
        if g.shapes[t_in] != (1, self.input_size, self.input_size, 3):
            raise ValueError(f"{g.path.name}: input shape {g.shapes[t_in]} != (1, {self.input_size}, "
                             f"{self.input_size}, 3)")
        t = _through_quantize(g, t_in)  # float -> int8 input quantisation: identity in float
        d = self.detail.load_tflite(g, t)
        s = self.stem.load_tflite(g, t)
        for blk in self.ge:
            s = blk.load_tflite(g, s)
        s = self.context.load_tflite(g, s)
        h = self.aggregate.load_tflite(g, d, s)
        logits = self.classifier.load_tflite(g, self.head.load_tflite(g, h))
        up = self.upsample.load_tflite(g, logits)
        # the rest of the graph: SOFTMAX -> [QUANTIZE] -> ARG_MAX over channels -> [RESHAPE]
        sm = g.only_consumer(up, "SOFTMAX")
        t = _through_quantize(g, sm.outputs[0])
        am = g.only_consumer(t, "ARG_MAX")
        t = am.outputs[0]
        while t not in g.outputs and g.consumers(t, "RESHAPE"):
            t = g.consumers(t, "RESHAPE")[0].outputs[0]
        if t not in g.outputs:
            raise ValueError(f"{g.path.name}: traced output {t} is not a graph output {g.outputs}")
        self.source_name, self.source_path = g.path.name, g.path


def load_bisenet(path: str | Path | None = None) -> BiSeNetV2:
    """The torch port with weights from a BiSeNetV2 TFLite file (default: the shared faceparse asset)."""
    if path is None:
        from engine.assets import find_asset

        path = find_asset(ASSET)
    g = QuantGraph(path)
    (t_in,) = g.inputs
    size = g.shapes[t_in][1]
    net = BiSeNetV2(size)
    net.load_tflite(g)
    return finalize(net)
