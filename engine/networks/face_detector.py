"""BlazeFace short-range face detector (MediaPipe face_detection_short_range.tflite).

Layer table: shared docs/mediapipe_models.md section 2.3. Input [B,3,128,128] RGB in [-1,1]
(letterboxed, black pad = -1); outputs raw regressors [B,896,16] and score logits [B,896,1] in the
anchor order of section 2.4 (16x16 level first, NHWC order). Decoding: preprocess.decode_detections.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .blocks import BlazeBlock, ConvAct, Sequential, TFConv2d, channels_last, finalize
from .tflite_weights import TFLiteGraph

INPUT_SIZE = 128
NUM_ANCHORS = 896


def _b(cin: int, cout: int, size: int, stride: int = 1) -> BlazeBlock:
    return BlazeBlock(cin, cout, stride, size, act="relu")


class FaceDetectorNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvAct(3, 24, 5, 2, "same", in_size=128, act="relu")                 # 64x64x24
        self.stage64 = Sequential(_b(24, 24, 64), _b(24, 28, 64))
        self.stage32 = Sequential(_b(28, 32, 64, 2), _b(32, 36, 32), _b(36, 42, 32))
        self.stage16 = Sequential(_b(42, 48, 32, 2), _b(48, 56, 16), _b(56, 64, 16), _b(64, 72, 16),
                                  _b(72, 80, 16), _b(80, 88, 16))                         # F16 16x16x88
        self.stage8 = Sequential(_b(88, 96, 16, 2), *[_b(96, 96, 8) for _ in range(4)])  # F8 8x8x96
        self.cls16 = TFConv2d(88, 2, 1, padding="valid")
        self.reg16 = TFConv2d(88, 32, 1, padding="valid")
        self.cls8 = TFConv2d(96, 6, 1, padding="valid")
        self.reg8 = TFConv2d(96, 96, 1, padding="valid")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f16 = self.stage16(self.stage32(self.stage64(self.stem(channels_last(x)))))
        f8 = self.stage8(f16)
        b = x.shape[0]
        # NHWC flatten: anchors ordered row, column, anchor-in-cell.
        reg = torch.cat([self.reg16(f16).permute(0, 2, 3, 1).reshape(b, 512, 16),
                         self.reg8(f8).permute(0, 2, 3, 1).reshape(b, 384, 16)], dim=1)
        cls = torch.cat([self.cls16(f16).permute(0, 2, 3, 1).reshape(b, 512, 1),
                         self.cls8(f8).permute(0, 2, 3, 1).reshape(b, 384, 1)], dim=1)
        return reg, cls

    def load_tflite(self, g: TFLiteGraph) -> None:
        t = self.stem.load_tflite(g, g.inputs[0])
        f16 = self.stage16.load_tflite(g, self.stage32.load_tflite(g, self.stage64.load_tflite(g, t)))
        f8 = self.stage8.load_tflite(g, f16)
        cls = [self.cls16.load_tflite(g, f16, 0), self.cls8.load_tflite(g, f8, 0)]
        reg = [self.reg16.load_tflite(g, f16, 1), self.reg8.load_tflite(g, f8, 1)]
        # each level: RESHAPE (NHWC flatten) -> CONCATENATION(16x16 level, 8x8 level) -> graph output
        for heads, out in ((reg, g.outputs[0]), (cls, g.outputs[1])):
            flat = [g.consumer(h, "RESHAPE").outputs[0] for h in heads]
            concat = g.consumer(flat[0], "CONCATENATION")
            if list(concat.inputs) != flat or concat.outputs[0] != out:
                raise ValueError(f"{g.path.name}: head wiring does not match output {g.names[out]}")


def load_face_detector(path: str | Path | None = None) -> FaceDetectorNet:
    if path is None:
        from engine.assets import find_asset
        path = find_asset("mediapipe_models/face_detection_short_range.tflite")
    net = FaceDetectorNet()
    net.load_tflite(TFLiteGraph(path))
    return finalize(net)
