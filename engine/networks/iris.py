"""Iris landmark network (MediaPipe iris_landmark.tflite, fp32 weights).

Layer table: shared docs/mediapipe_models.md section 6.3. Input [B,3,64,64] RGB in [0,1] (eye crop,
see preprocess.crop_eyes); outputs eye contours [B,71,3] and iris [B,5,3] in 64-px crop units.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .blocks import (ConvAct, DownBottleneck, ParallelDownBottleneck, ParallelResBottleneck, ParallelSequential,
                     ResBottleneck, Sequential, TFConv2d, channels_last, finalize)
from .tflite_weights import TFLiteGraph

INPUT_SIZE = 64


class IrisNet(nn.Module):
    """forward(x [B,3,64,64] in [0,1]) -> (eye contours [B,71,3], iris [B,5,3]) in 64-px crop units.

    Layers (6.3): stem conv 3x3/2 + PReLU; 4x r(64,32); d(64->128;64), 4x r(128,64);
    d(128->128;64) -> 8x8x128, then two branches (eye contour, iris) of identical shape:
    2x r, d -> 4x4, 2x r, d -> 2x2, 2x r (run as one grouped 2-stream block), and each its own
    conv 2x2 VALID to 213 / 15 values.
    """

    def __init__(self):
        super().__init__()
        self.stem = ConvAct(3, 64, 3, 2, "same", in_size=64)                               # 32x32x64
        self.stage32 = Sequential(*[ResBottleneck(64, 32) for _ in range(4)])
        self.stage16 = Sequential(DownBottleneck(64, 128, 64), *[ResBottleneck(128, 64) for _ in range(4)])
        self.down8 = DownBottleneck(128, 128, 64)                                          # 8x8x128
        self.branches = ParallelSequential(                                                # 2 x 2x2x128
            ParallelResBottleneck(2, 128, 64), ParallelResBottleneck(2, 128, 64), ParallelDownBottleneck(2, 128, 64),
            ParallelResBottleneck(2, 128, 64), ParallelResBottleneck(2, 128, 64), ParallelDownBottleneck(2, 128, 64),
            ParallelResBottleneck(2, 128, 64), ParallelResBottleneck(2, 128, 64))
        self.contour_out = TFConv2d(128, 71 * 3, 2, 1, "valid")
        self.iris_out = TFConv2d(128, 5 * 3, 2, 1, "valid")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f8 = self.down8(self.stage16(self.stage32(self.stem(channels_last(x)))))
        b = self.branches(torch.cat([f8, f8], dim=1))
        contours = self.contour_out(b[:, :128])   # [B,213,1,1]
        iris = self.iris_out(b[:, 128:])          # [B,15,1,1]
        return contours.reshape(-1, 71, 3), iris.reshape(-1, 5, 3)

    def load_tflite(self, g: TFLiteGraph) -> None:
        t = self.stem.load_tflite(g, g.inputs[0])
        f8 = self.down8.load_tflite(g, self.stage16.load_tflite(g, self.stage32.load_tflite(g, t)))
        t_c, t_i = self.branches.load_tflite(g, [f8, f8], [0, 1])
        t_c, t_i = self.contour_out.load_tflite(g, t_c), self.iris_out.load_tflite(g, t_i)
        outs = [g.consumer(t_c, "RESHAPE").outputs[0], g.consumer(t_i, "RESHAPE").outputs[0]]
        if outs != g.outputs:
            raise ValueError(f"{g.path.name}: traced outputs {outs} != graph outputs {g.outputs}")


def load_iris(path: str | Path | None = None) -> IrisNet:
    if path is None:
        from engine.assets import find_asset
        path = find_asset("mediapipe_models/iris_landmark.tflite")
    net = IrisNet()
    net.load_tflite(TFLiteGraph(path))
    return finalize(net)
