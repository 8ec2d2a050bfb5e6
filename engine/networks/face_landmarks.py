"""Face landmark networks (MediaPipe face_landmark.tflite and face_landmark_with_attention.tflite).

Layer tables: docs/mediapipe_models.md (shared docs) sections 4.3, 5.3, custom ops 5.4, assembly 5.5.
Input: [B,3,192,192] RGB in [0,1] (crop of a face ROI). Outputs are in 192-px crop units.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (BlazeBlock, ConvAct, ParallelBlazeBlock, ParallelConvAct, ParallelSequential, Sequential,
                     TFConv2d, blaze_stage, channels_last, finalize)
from .tflite_weights import TFLiteGraph

INPUT_SIZE = 192
NUM_LANDMARKS = 468

# LandmarksRefinement index maps (section 5.5); also the subset_idxs of Landmarks2TransformMatrix.
LIPS_IDX = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270, 409, 78, 95,
            88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415, 76, 77, 90, 180,
            85, 16, 315, 404, 320, 307, 306, 184, 74, 73, 72, 11, 302, 303, 304, 408, 62, 96, 89, 179, 86, 15,
            316, 403, 319, 325, 292, 183, 42, 41, 38, 12, 268, 271, 272, 407)
LEFT_EYE_IDX = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173, 130, 25, 110, 24,
                23, 22, 26, 112, 243, 247, 30, 29, 27, 28, 56, 190, 226, 31, 228, 229, 230, 231, 232, 233, 244,
                113, 225, 224, 223, 222, 221, 189, 35, 124, 46, 53, 52, 65, 143, 111, 117, 118, 119, 120, 121,
                128, 245, 156, 70, 63, 105, 66, 107, 55, 193)
RIGHT_EYE_IDX = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398, 359, 255, 339,
                 254, 253, 252, 256, 341, 463, 467, 260, 259, 257, 258, 286, 414, 446, 261, 448, 449, 450, 451,
                 452, 453, 464, 342, 445, 444, 443, 442, 441, 413, 265, 353, 276, 283, 282, 295, 372, 340, 346,
                 347, 348, 349, 350, 357, 465, 383, 300, 293, 334, 296, 336, 285, 417)
# (left_rotation_idx, right_rotation_idx) of the three Landmarks2TransformMatrix instances.
LIPS_ROT, LEFT_EYE_ROT, RIGHT_EYE_ROT = (61, 291), (33, 133), (362, 263)


def _default(path: str | Path | None, name: str) -> Path:
    if path is not None:
        return Path(path)
    from engine.assets import find_asset
    return find_asset(f"mediapipe_models/{name}")


class FaceMeshTrunk(nn.Module):
    """Stem + stages down to T6 (6x6x128); also returns F48 (48x48x32, output of b(16->32,/2))."""

    def __init__(self):
        super().__init__()
        self.stem = ConvAct(3, 16, 3, 2, "same", in_size=192)                         # 96x96x16
        self.stage96 = Sequential(BlazeBlock(16, 16, 1, 96), BlazeBlock(16, 16, 1, 96))
        self.down48 = BlazeBlock(16, 32, 2, 96)                                        # F48
        self.stage48 = Sequential(BlazeBlock(32, 32, 1, 48), BlazeBlock(32, 32, 1, 48))
        self.stage24 = Sequential(*blaze_stage(32, 64, 2, 2, 48, "prelu"))            # 24x24x64
        self.stage12 = Sequential(*blaze_stage(64, 128, 2, 2, 24, "prelu"))           # 12x12x128
        self.stage6 = Sequential(*blaze_stage(128, 128, 2, 2, 12, "prelu"))           # T6

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f48 = self.down48(self.stage96(self.stem(x)))
        t6 = self.stage6(self.stage12(self.stage24(self.stage48(f48))))
        return f48, t6

    def load_tflite(self, g: TFLiteGraph, t: int) -> tuple[int, int]:
        t = self.stage96.load_tflite(g, self.stem.load_tflite(g, t))
        f48 = self.down48.load_tflite(g, t)
        t6 = self.stage6.load_tflite(g, self.stage12.load_tflite(g, self.stage24.load_tflite(
            g, self.stage48.load_tflite(g, f48))))
        return f48, t6


def _head_to_f3() -> Sequential:
    """T6 -> b(128,/2) -> 2x b(128) -> 1x1 128->32 + PReLU -> b(32): F3 (3x3x32)."""
    return Sequential(*blaze_stage(128, 128, 2, 2, 6, "prelu"), ConvAct(128, 32, 1, padding="valid"),
                      BlazeBlock(32, 32, 1, 3))


class FaceLandmarkNet(nn.Module):
    """468-point face mesh. forward(x [B,3,192,192] in [0,1]) -> (landmarks [B,468,3] in 192-px crop
    units, presence logit [B])."""

    def __init__(self):
        super().__init__()
        self.trunk = FaceMeshTrunk()
        self.mesh_head = _head_to_f3()
        self.mesh_out = TFConv2d(32, 3 * NUM_LANDMARKS, 3, 3, "valid")
        self.presence_head = Sequential(BlazeBlock(128, 128, 2, 6), ConvAct(128, 32, 1, padding="valid"),
                                        BlazeBlock(32, 32, 1, 3))
        self.presence_out = TFConv2d(32, 1, 3, 3, "valid")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, t6 = self.trunk(channels_last(x))
        mesh = self.mesh_out(self.mesh_head(t6))                    # [B,1404,1,1]
        presence = self.presence_out(self.presence_head(t6))        # [B,1,1,1]
        return mesh.reshape(-1, NUM_LANDMARKS, 3), presence.reshape(-1)

    def load_tflite(self, g: TFLiteGraph) -> None:
        _, t6 = self.trunk.load_tflite(g, g.inputs[0])
        t_mesh = self.mesh_out.load_tflite(g, self.mesh_head.load_tflite(g, t6, branch=0))
        t_pres = self.presence_out.load_tflite(g, self.presence_head.load_tflite(g, t6, branch=1))
        if [t_mesh, t_pres] != g.outputs:
            raise ValueError(f"{g.path.name}: traced outputs {[t_mesh, t_pres]} != graph outputs {g.outputs}")


def load_face_landmarks(path: str | Path | None = None) -> FaceLandmarkNet:
    net = FaceLandmarkNet()
    net.load_tflite(TFLiteGraph(_default(path, "face_landmark.tflite")))
    return finalize(net)


# ============================================================================ attention mesh (478)
# The three MediaPipe custom ops (version 2), section 5.4, as plain batched tensor functions.

def landmarks_to_transform_matrix(landmarks: torch.Tensor, subset_idx: torch.Tensor, left_idx: int,
                                  right_idx: int, out_size: int = 16, scale: float = 1.5) -> torch.Tensor:
    """`Landmarks2TransformMatrix` (target_rotation_radians = 0): landmarks [B,N,2+] (48-grid units)
    -> [B,4,4] matrix mapping patch-pixel coordinates to grid coordinates:
    M = Translate(c) @ Rot(phi) @ Scale(scale*cw/out, scale*ch/out) @ Translate(-out/2, -out/2),
    phi = angle left->right landmark, (cw, ch) and c = size and centre of the subset's box in the
    frame rotated by -phi. Only rows 0, 1 (x, y) are used downstream; row 2/3 are identity."""
    p = landmarks[..., :2]
    d = p[:, right_idx] - p[:, left_idx]                       # [B,2]
    phi = torch.atan2(d[:, 1], d[:, 0])
    cos, sin = torch.cos(phi)[:, None], torch.sin(phi)[:, None]
    sub = p.index_select(1, subset_idx)                        # [B,K,2]
    # rotate by r = -phi: x' = cos*x + sin*y, y' = -sin*x + cos*y
    xr = cos * sub[..., 0] + sin * sub[..., 1]
    yr = -sin * sub[..., 0] + cos * sub[..., 1]
    x0, x1 = xr.min(dim=1).values, xr.max(dim=1).values
    y0, y1 = yr.min(dim=1).values, yr.max(dim=1).values
    ccx, ccy = (x0 + x1) / 2, (y0 + y1) / 2                    # box centre, rotated frame
    cos, sin = cos[:, 0], sin[:, 0]
    cx, cy = cos * ccx - sin * ccy, sin * ccx + cos * ccy      # rotate back by +phi
    sx, sy = scale * (x1 - x0) / out_size, scale * (y1 - y0) / out_size
    a00, a01, a10, a11 = cos * sx, -sin * sy, sin * sx, cos * sy
    half = out_size / 2.0
    tx = cx - (a00 + a01) * half
    ty = cy - (a10 + a11) * half
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([a00, a01, zero, tx,
                        a10, a11, zero, ty,
                        zero, zero, one, zero,
                        zero, zero, zero, one], dim=1).reshape(-1, 4, 4)


def transform_tensor_bilinear(feature: torch.Tensor, matrix: torch.Tensor, out_h: int = 16,
                              out_w: int = 16) -> torch.Tensor:
    """`TransformTensorBilinear`: feature [B,C,H,W], matrix [B,4,4] -> [B,C,out_h,out_w].
    Output pixel (u, v) samples (X, Y) = M[:2] @ (u+.5, v+.5, 0, 1) - 0.5; all channels are 0 if
    (X, Y) lies outside [0, W-1] x [0, H-1], else bilinear with out-of-map neighbours read as 0."""
    _, _, H, W = feature.shape
    u = torch.arange(out_w, device=feature.device, dtype=feature.dtype)[None, None, :] + 0.5
    v = torch.arange(out_h, device=feature.device, dtype=feature.dtype)[None, :, None] + 0.5
    m = matrix[:, :2, :, None, None]                          # [B,2,4,1,1]
    X = m[:, 0, 0] * u + m[:, 0, 1] * v + m[:, 0, 3] - 0.5    # [B,out_h,out_w]
    Y = m[:, 1, 0] * u + m[:, 1, 1] * v + m[:, 1, 3] - 0.5
    inside = (X >= 0) & (X <= W - 1) & (Y >= 0) & (Y <= H - 1)
    grid = torch.stack([X * (2.0 / (W - 1)) - 1.0, Y * (2.0 / (H - 1)) - 1.0], dim=-1)
    out = F.grid_sample(feature, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out * inside[:, None].to(out.dtype)


def transform_landmarks(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """`TransformLandmarks`: points [B,N,2], matrix [B,4,4] -> (m00 x + m01 y + m03, m10 x + m11 y + m13)."""
    return points @ matrix[:, :2, :2].transpose(1, 2) + matrix[:, None, :2, 3]


# Elementwise factor applied to each region matrix before TransformLandmarks (graph constant, 5.3):
# it scales the translation column by 4 (48-grid -> 192-px crop units; patch 16 -> 64 frame).
_PATCH_TO_CROP = ((1.0, 1.0, 4.0, 4.0), (1.0, 1.0, 4.0, 4.0), (0.25, 0.25, 1.0, 1.0), (0.25, 0.25, 1.0, 1.0))


# Output streams of the attention model, in the order they run as one grouped block:
# (name, region that feeds it, number of 2-D points, branch among the consumers of the region's 4x4 map)
STREAMS = (("lips", 0, len(LIPS_IDX), 0), ("left_eye", 1, len(LEFT_EYE_IDX), 0), ("left_iris", 1, 5, 1),
           ("right_eye", 2, len(RIGHT_EYE_IDX), 0), ("right_iris", 2, 5, 1))
REGIONS = (("lips", LIPS_IDX, LIPS_ROT), ("left_eye", LEFT_EYE_IDX, LEFT_EYE_ROT),
           ("right_eye", RIGHT_EYE_IDX, RIGHT_EYE_ROT))


class AttentionMeshNet(nn.Module):
    """478-point attention mesh (face_landmark_with_attention.tflite).

    forward(x [B,3,192,192] in [0,1]) -> (points [B,478,3] in 192-px crop units, presence logit [B]).
    Points are assembled as LandmarksRefinementCalculator does (5.5): the 468-point mesh, lips and
    eyes overwrite x, y (z kept), then iris 468-472 (image-left eye, mesh 33/133) and 473-477
    (image-right eye, 362/263) with z = mean mesh z of the eye's first 16 contour indices.
    `raw(x)` gives the 7 network outputs before assembly.

    Layers (5.3): the 468-model trunk gives F48 and the coarse mesh; each region (lips, left eye,
    right eye) samples a 16x16x32 patch of F48 and runs 2x b(32), b(32->64,/2), 2x b(64),
    b(64->128,/2) (the 3 regions run as one grouped block); the 5 output streams (lips, eye contour
    and iris per eye) run 2x b(128), b(128,/2), 2x b(128), 1x1 128->32 + PReLU, b(32) (grouped, 5
    streams), then each its own conv 2x2 VALID.
    """

    def __init__(self):
        super().__init__()
        self.trunk = FaceMeshTrunk()
        self.mesh_head = _head_to_f3()
        self.mesh_out = TFConv2d(32, 3 * NUM_LANDMARKS, 3, 3, "valid")
        self.presence_out = TFConv2d(32, 1, 3, 3, "valid")
        self.region_trunk = ParallelSequential(
            ParallelBlazeBlock(3, 32, 32, 1, 16), ParallelBlazeBlock(3, 32, 32, 1, 16),
            ParallelBlazeBlock(3, 32, 64, 2, 16), ParallelBlazeBlock(3, 64, 64, 1, 8),
            ParallelBlazeBlock(3, 64, 64, 1, 8), ParallelBlazeBlock(3, 64, 128, 2, 8))      # 3 x 4x4x128
        self.stream_body = ParallelSequential(
            ParallelBlazeBlock(5, 128, 128, 1, 4), ParallelBlazeBlock(5, 128, 128, 1, 4),
            ParallelBlazeBlock(5, 128, 128, 2, 4), ParallelBlazeBlock(5, 128, 128, 1, 2),
            ParallelBlazeBlock(5, 128, 128, 1, 2), ParallelConvAct(5, 128, 32),
            ParallelBlazeBlock(5, 32, 32, 1, 2))                                              # 5 x 2x2x32
        self.stream_out = nn.ModuleList(TFConv2d(32, 2 * n, 2, 2, "valid") for _, _, n, _ in STREAMS)
        for name, idx, _ in REGIONS:
            self.register_buffer(f"{name}_idx", torch.tensor(idx, dtype=torch.long), persistent=False)
        self.register_buffer("patch_to_crop", torch.tensor(_PATCH_TO_CROP), persistent=False)
        # region r's channels feed stream s: channel gather for the 3 -> 5 stream split
        src = [r * 128 + c for _, r, _, _ in STREAMS for c in range(128)]
        self.register_buffer("stream_channels", torch.tensor(src, dtype=torch.long), persistent=False)
        # Assembly: xy of point i = cat([mesh, lips, left_eye, right_eye])[xy_source[i]].
        xy_src = list(range(NUM_LANDMARKS))
        off = NUM_LANDMARKS
        for _, idx, _ in REGIONS:
            for k, i in enumerate(idx):
                xy_src[i] = off + k
            off += len(idx)
        self.register_buffer("xy_source", torch.tensor(xy_src, dtype=torch.long), persistent=False)

    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The 7 outputs: mesh [B,468,3], lips [B,80,2], left/right_eye [B,71,2], left/right_iris
        [B,5,2] (192-px crop units) and presence [B] (logit)."""
        f48, t6 = self.trunk(channels_last(x))
        f3 = self.mesh_head(t6)
        mesh = self.mesh_out(f3).reshape(-1, NUM_LANDMARKS, 3)
        presence = self.presence_out(f3).reshape(-1)
        grid_pts = mesh * 0.25                                    # 192-px crop -> 48-grid units
        mats = [landmarks_to_transform_matrix(grid_pts, getattr(self, f"{name}_idx"), *rot)
                for name, _, rot in REGIONS]
        patches = torch.cat([transform_tensor_bilinear(f48, m) for m in mats], dim=1)   # [B,3*32,16,16]
        regions = self.region_trunk(channels_last(patches))                            # [B,3*128,4,4]
        streams = self.stream_body(regions.index_select(1, self.stream_channels))       # [B,5*32,2,2]
        out = {"mesh": mesh, "presence": presence}
        for k, ((name, r, n, _), conv) in enumerate(zip(STREAMS, self.stream_out)):
            pts = conv(streams[:, 32 * k:32 * (k + 1)]).reshape(-1, n, 2)             # 64-px patch frame
            out[name] = transform_landmarks(pts, mats[r] * self.patch_to_crop)
        return out

    def assemble(self, r: dict[str, torch.Tensor]) -> torch.Tensor:
        mesh = r["mesh"]
        xy = torch.cat([mesh[..., :2], r["lips"], r["left_eye"], r["right_eye"]], dim=1).index_select(1, self.xy_source)
        pts = torch.cat([xy, mesh[..., 2:]], dim=-1)
        z_left = mesh[:, self.left_eye_idx[:16], 2].mean(dim=1, keepdim=True)     # [B,1]
        z_right = mesh[:, self.right_eye_idx[:16], 2].mean(dim=1, keepdim=True)
        iris_l = torch.cat([r["left_iris"], z_left[:, :, None].expand(-1, 5, 1)], dim=-1)
        iris_r = torch.cat([r["right_iris"], z_right[:, :, None].expand(-1, 5, 1)], dim=-1)
        return torch.cat([pts, iris_l, iris_r], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.raw(x)
        return self.assemble(r), r["presence"]

    # ------------------------------------------------------------ weights
    def load_tflite(self, g: TFLiteGraph) -> None:
        f48, t6 = self.trunk.load_tflite(g, g.inputs[0])
        f3 = self.mesh_head.load_tflite(g, t6)
        t_mesh = self.mesh_out.load_tflite(g, f3, branch=0)
        t_pres = self.presence_out.load_tflite(g, f3, branch=1)
        # mesh -> RESHAPE [1,468,3] -> MUL 0.25 -> Landmarks2TransformMatrix (one chain per region)
        matrices = {}
        for reshape in g.consumers(t_mesh, "RESHAPE"):
            mul = g.consumer(reshape.outputs[0], "MUL")
            if not np.allclose(g.weights(mul)[0], 0.25):
                raise ValueError(f"MUL op {mul.index}: expected 0.25")
            op = g.consumer(mul.outputs[0], "Landmarks2TransformMatrix")
            matrices[op.custom_options["left_rotation_idx"]] = op
        patches, scaled = [], []
        for name, idx, rot in REGIONS:
            op = matrices[rot[0]]
            o = op.custom_options
            expect = dict(left_rotation_idx=rot[0], right_rotation_idx=rot[1], output_height=16, output_width=16,
                          scale_x=1.5, scale_y=1.5, target_rotation_radians=0.0)
            if any(o[k] != v for k, v in expect.items()) or set(o["subset_idxs"]) != set(idx):
                raise ValueError(f"{name}: Landmarks2TransformMatrix options {o} differ from the port")
            t_m = op.outputs[0]
            ttb = [c for c in g.consumers(t_m, "TransformTensorBilinear") if c.inputs == (f48, t_m)][0]
            if ttb.custom_options.get("output_height") != 16 or ttb.custom_options.get("output_width") != 16:
                raise ValueError(f"{name}: TransformTensorBilinear options {ttb.custom_options}")
            patches.append(ttb.outputs[0])
            mul = g.consumer(t_m, "MUL")
            if not np.allclose(g.weights(mul)[0].reshape(4, 4), np.array(_PATCH_TO_CROP)):
                raise ValueError(f"{name}: unexpected matrix scale constant in MUL op {mul.index}")
            scaled.append(mul.outputs[0])
        t4 = self.region_trunk.load_tflite(g, patches, [0, 0, 0])
        t2 = self.stream_body.load_tflite(g, [t4[r] for _, r, _, _ in STREAMS], [br for *_, br in STREAMS])
        for (name, r, n, _), conv, t in zip(STREAMS, self.stream_out, t2):
            t_out = g.consumer(conv.load_tflite(g, t), "RESHAPE").outputs[0]
            tl = g.consumer(t_out, "TransformLandmarks")
            final = g.consumer(tl.outputs[0], "RESHAPE").outputs[0]
            if tl.inputs != (t_out, scaled[r]) or g.names[final] != f"output_{name}":
                raise ValueError(f"{name}: stream traced to {g.names[final]} (TransformLandmarks op {tl.index})")
        slice_op = g.consumer(t_mesh, "STRIDED_SLICE")
        if g.names[slice_op.outputs[0]] != "output_mesh_identity" or g.names[t_pres] != "conv_faceflag":
            raise ValueError(f"{g.path.name}: mesh/presence outputs traced wrongly")


def load_attention_mesh(path: str | Path | None = None) -> AttentionMeshNet:
    net = AttentionMeshNet()
    net.load_tflite(TFLiteGraph(_default(path, "face_landmark_with_attention.tflite")))
    return finalize(net)
