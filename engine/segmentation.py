"""Segmentation engines: 8 face-part masks per face for PRDL (DESIGN.md, stage 3).

Two engines, one output type (`PartMasks`):

* `LandmarkSegmenter` (default, commercially clean): the masks are rasterised from the landmark
  network's contours (MediaPipe's ``face_mesh_contours.json``), with a vectorised scanline fill.
* `ParserSegmenter` (quality mode, optional): the BiSeNetV2 CelebAMask-HQ face parser
  (``engine/networks/bisenet.py``) on a crop around the face; its 19 classes are mapped to the 8
  parts. Its training data is non-commercial (see the asset's README), so it is never the default.

Both return the masks in the same square crop (`face_crop`: the landmark box x1.25, rotated with the
eye line), so their masks can be compared pixel by pixel and PRDL reads either the same way. Both
have ``segment(image_rgb, landmarks_px, size)`` as a common call.

Speed (2-core CPU): `LandmarkSegmenter` at 128 px ~0.6 ms per face (the scanline fill of its 9
polygons ~0.45 ms); `ParserSegmenter` ~70 ms per face on CPU (torch), ~14 ms on an H200 at batch 1.

Conventions
-----------
* Part order: `PART_NAMES` (engine.face_topology). Left/right are the subject's own: in an unmirrored
  image ``left_eye`` is on the image's right.
* Crop coordinates: mask pixel ``masks[p, r, c]`` has its centre at crop point ``(x, y) = (c, r)``;
  ``np.argwhere(mask)[:, ::-1]`` gives crop points that `PartMasks.to_image` maps to image pixels
  (image pixel centres at integers, as everywhere in the engine).
* The crop is a `Roi` (centre, side, rotation theta; positive theta turns clockwise on screen, as in
  engine.networks.preprocess): crop point ``p`` maps to ``c + Rot(theta) @ (((p + 0.5) / S - 0.5) * side)``.

Landmark polygons (all from data files, no hand-typed contours except the nose set below)
---------------------------------------------------------------------------------------
* eye = the eye-opening contour of that eye (the eyelid loop);
* brow = the polygon of the upper brow polyline followed by the reversed lower polyline;
* upper lip = outer upper-lip contour (corner to corner) then the inner upper-lip contour back;
  lower lip likewise; the mouth interior (inside the inner lip loop) belongs to no part;
* nose = convex hull of MediaPipe's ``nose_outline`` group (canonical_face_model_landmarks_indices.txt)
  plus the nasal-dorsum / tip / columella points `NOSE_EXTRA` (so the tip's silhouette is covered
  under yaw, where it sticks out of the outline);
* skin = inside the face oval, below the forehead cut, minus every other part and the mouth
  interior. Forehead cut (PRDL removes "the forehead region above the eyebrows, using the eyebrow
  position"): per crop column, the skin keeps the pixels below the polyline through both upper brow
  contours (linear between the two medial brow ends over the glabella, held level beyond the lateral
  ends), so it moves with the brows.
* Overlaps are resolved by priority eyes > brows > upper lip > lower lip > nose > skin; the 8 masks
  are disjoint.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.face_topology import (MP_CONTOURS_ASSET, MP_INDICES_ASSET, MP_OBJ_ASSET, PART_NAMES,
                                  contour_geometry, read_index_groups, read_obj_vertices)
from engine.networks.preprocess import Roi

__all__ = ["PART_NAMES", "PartMasks", "LandmarkSegmenter", "ParserSegmenter", "face_crop", "fill_polygons",
           "PARSER_CLASSES", "PARSER_TO_PART"]

CROP_SCALE = 1.25  # crop side = landmark box side (in the face frame) x this
# Nasal dorsum, tip and columella points added to the nose outline before the convex hull.
NOSE_EXTRA = (6, 197, 195, 5, 4, 1, 19, 94, 2)
EYE_LINE = (33, 263)  # rotation of the crop: subject's right eye outer corner -> left eye outer corner

PARSER_CLASSES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
                  "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
# CelebAMask-HQ l_*/r_* are the IMAGE's left/right = the subject's right/left (faceparse README).
PARSER_TO_PART = {1: "skin", 2: "right_brow", 3: "left_brow", 4: "right_eye", 5: "left_eye", 10: "nose",
                  12: "upper_lip", 13: "lower_lip"}
# Parser crop (README: "a square crop about 1.9x a face box, shifted up a little"), measured from the
# landmark box in the face frame (larger than a detector box): side = PARSER_SCALE x box side, centre
# moved up by PARSER_SHIFT x side. Chosen on 8 real faces by the parser/landmark mask IoU; scales
# 1.3-1.9 and shifts -0.05..0.05 changed the mean IoU by < 0.03, 1.7 / 0.05 was best (0.617).
PARSER_SCALE = 1.7
PARSER_SHIFT = 0.05


# ---------------------------------------------------------------- output type

@dataclass
class PartMasks:
    """8 disjoint part masks in a square crop of the image."""
    masks: np.ndarray   # bool (8, S, S), order PART_NAMES
    crop: Roi           # the crop in image pixels (square, w == h, rotated by theta)
    source: str         # "landmarks" or "bisenetv2:<file name>"

    @property
    def size(self) -> int:
        return int(self.masks.shape[-1])

    def part(self, name: str) -> np.ndarray:
        return self.masks[PART_NAMES.index(name)]

    def label_map(self) -> np.ndarray:
        """(S, S) int8: part index per pixel, -1 where no part."""
        lab = np.full(self.masks.shape[1:], -1, np.int8)
        for i in range(len(self.masks)):
            lab[self.masks[i]] = i
        return lab

    def to_image(self, xy_crop) -> np.ndarray:
        """Crop points (N, 2) (pixel centres at integers) -> image pixels (N, 2)."""
        return crop_to_image(np.asarray(xy_crop, np.float64), self.crop, self.size)

    def to_crop(self, xy_image) -> np.ndarray:
        """Image pixels (N, 2) -> crop points (N, 2); inverse of `to_image`."""
        return image_to_crop(np.asarray(xy_image, np.float64), self.crop, self.size)

    def frame(self) -> "CropFrame":
        """Where this crop lies, without the masks."""
        return CropFrame(self.crop, self.size)

    def points(self, name: str, image: bool = True) -> np.ndarray:
        """(N, 2) coordinates of the pixels of part `name`: image pixels, or crop points."""
        xy = np.argwhere(self.part(name))[:, ::-1].astype(np.float64)
        return self.to_image(xy) if image else xy


@dataclass
class CropFrame:
    """Where a part-mask crop lies in the image, without its masks: all that refinement needs of `PartMasks` once
    the target descriptors are computed (its size and `to_crop`), small enough to send to another process."""
    crop: Roi
    size: int

    def to_crop(self, xy_image) -> np.ndarray:
        return image_to_crop(np.asarray(xy_image, np.float64), self.crop, self.size)


def crop_to_image(xy: np.ndarray, roi: Roi, size: int) -> np.ndarray:
    c, s = math.cos(roi.theta), math.sin(roi.theta)
    u = ((xy[..., 0] + 0.5) / size - 0.5) * roi.w
    v = ((xy[..., 1] + 0.5) / size - 0.5) * roi.h
    return np.stack([roi.cx + c * u - s * v, roi.cy + s * u + c * v], -1)


def image_to_crop(xy: np.ndarray, roi: Roi, size: int) -> np.ndarray:
    c, s = math.cos(roi.theta), math.sin(roi.theta)
    dx, dy = xy[..., 0] - roi.cx, xy[..., 1] - roi.cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.stack([(u / roi.w + 0.5) * size - 0.5, (v / roi.h + 0.5) * size - 0.5], -1)


def face_crop(landmarks_px, scale: float = CROP_SCALE, shift_up: float = 0.0) -> Roi:
    """Square crop around the landmarks, rotated with the eye line (33 -> 263): the box of the points
    in that rotated frame, its longer side x `scale`, centre moved up (face frame) by shift_up x side."""
    p = np.asarray(landmarks_px, np.float64)[:, :2]
    d = p[EYE_LINE[1]] - p[EYE_LINE[0]]
    theta = math.atan2(d[1], d[0])
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * p[:, 0] + s * p[:, 1], -s * p[:, 0] + c * p[:, 1]  # face frame (rotated by -theta)
    side = max(u.max() - u.min(), v.max() - v.min()) * scale
    uc, vc = (u.max() + u.min()) / 2.0, (v.max() + v.min()) / 2.0 - shift_up * side
    return Roi(c * uc - s * vc, s * uc + c * vc, side, side, theta)


# ---------------------------------------------------------------- polygon fill

def fill_polygons(polys: list[np.ndarray], size: int) -> np.ndarray:
    """Even-odd fill of closed polygons on a size x size pixel grid (pixel (r, c) centred at (c, r)).

    Vectorised scanline fill: every edge's crossing with every pixel-centre row gives the first column
    at or right of it; a bincount of those toggles and a cumulative sum along each row give the parity.
    Same answers as the ray test `face_topology.points_in_polygon` (a centre exactly on a left/top edge
    is inside, on a right/bottom edge outside). Returns bool (len(polys), size, size); points may lie
    outside the grid.
    """
    P, S = len(polys), int(size)
    if P == 0:
        return np.zeros((0, S, S), bool)
    a = np.concatenate([np.asarray(q, np.float64).reshape(-1, 2) for q in polys])
    b = np.concatenate([np.roll(np.asarray(q, np.float64).reshape(-1, 2), -1, 0) for q in polys])
    pid = np.repeat(np.arange(P), [len(q) for q in polys])
    y0, y1 = a[:, 1:2], b[:, 1:2]
    rows = np.arange(S, dtype=np.float64)[None]
    cross = (y0 > rows) != (y1 > rows)                   # (E, S): half-open rule, no double counts
    e, r = np.nonzero(cross)
    t = (r - a[e, 1]) / (b[e, 1] - a[e, 1])
    xi = a[e, 0] + t * (b[e, 0] - a[e, 0])
    k = np.clip(np.ceil(xi).astype(np.int64), 0, S)      # first pixel column at or right of xi
    flat = (pid[e] * S + r) * (S + 1) + k
    toggles = np.bincount(flat, minlength=P * S * (S + 1)).reshape(P, S, S + 1)[:, :, :S]
    return (np.cumsum(toggles, axis=2, dtype=np.int16) & 1).astype(bool)


def convex_hull(pts: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain) of (N, 2) points, as a closed polygon without repeat."""
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq):
        out = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.asarray(lower[:-1] + upper[:-1])


# ---------------------------------------------------------------- contour topology

@dataclass(frozen=True)
class _Topology:
    polys: dict        # name -> landmark index array of a closed polygon
    brow_tops: tuple   # (right upper brow, left upper brow), lateral -> medial
    nose_hull_ids: np.ndarray
    eye_lids: dict     # side -> (upper lid ids, lower lid ids), paired by position


@lru_cache(maxsize=1)
def _topology_from(obj_path: str, contours_path: str, indices_path: str) -> _Topology:
    mp, _ = read_obj_vertices(Path(obj_path))
    cg = contour_geometry(json.loads(Path(contours_path).read_text()), mp)
    groups = read_index_groups(Path(indices_path))
    polys = {
        "left_eye": cg["left_eye"], "right_eye": cg["right_eye"],
        "left_brow": cg["left_brow_upper"] + cg["left_brow_lower"][::-1],
        "right_brow": cg["right_brow_upper"] + cg["right_brow_lower"][::-1],
        "upper_lip": cg["lips_outer_upper"] + cg["lips_inner_upper"][::-1],
        "lower_lip": cg["lips_outer_lower"] + cg["lips_inner_lower"][::-1],
        "mouth": cg["lips_inner"], "face_oval": cg["face_oval"],
    }
    nose_ids = np.array(list(dict.fromkeys(list(groups["nose_outline"]) + list(NOSE_EXTRA))), np.int64)
    lids = {s: (cg[f"{s}_eye_upper"], cg[f"{s}_eye_lower"]) for s in ("left", "right")}
    return _Topology({k: np.asarray(v, np.int64) for k, v in polys.items()},
                     (tuple(cg["right_brow_upper"]), tuple(cg["left_brow_upper"])), nose_ids, lids)


def contour_topology() -> _Topology:
    from engine.assets import find_asset

    return _topology_from(str(find_asset(MP_OBJ_ASSET)), str(find_asset(MP_CONTOURS_ASSET)),
                          str(find_asset(MP_INDICES_ASSET)))


# ---------------------------------------------------------------- landmark engine

class LandmarkSegmenter:
    """Part masks rasterised from the 478 MediaPipe landmarks (see the module docstring)."""

    source = "landmarks"

    def __init__(self, crop_scale: float = CROP_SCALE):
        self.crop_scale = crop_scale
        self.topo = contour_topology()

    def __call__(self, landmarks_px, image_shape=None, size: int = 128, crop: Roi | None = None) -> PartMasks:
        """landmarks_px (478, 2+) image pixels; image_shape (H, W) is accepted for interface symmetry
        (the crop may extend past the image: masks there are still geometric). `crop` overrides the
        default `face_crop`."""
        lm = np.asarray(landmarks_px, np.float64)[:, :2]
        roi = crop if crop is not None else face_crop(lm, self.crop_scale)
        return PartMasks(self.rasterise(image_to_crop(lm, roi, size), size), roi, self.source)

    def segment(self, image_rgb, landmarks_px, size: int = 128) -> PartMasks:
        """Common engine interface (image, landmarks, size)."""
        return self(landmarks_px, None if image_rgb is None else np.shape(image_rgb)[:2], size)

    def rasterise(self, pts: np.ndarray, size: int) -> np.ndarray:
        """(8, size, size) disjoint masks from landmarks already in crop coordinates (478, 2)."""
        t = self.topo
        order = ("left_eye", "right_eye", "left_brow", "right_brow", "upper_lip", "lower_lip", "mouth",
                 "face_oval")
        polys = [pts[t.polys[n]] for n in order] + [convex_hull(pts[t.nose_hull_ids])]
        f = dict(zip(order + ("nose",), fill_polygons(polys, size)))
        out = np.zeros((len(PART_NAMES), size, size), bool)
        taken = np.zeros((size, size), bool)
        for name in ("left_eye", "right_eye", "left_brow", "right_brow", "upper_lip", "lower_lip", "nose"):
            m = f[name] & ~taken
            out[PART_NAMES.index(name)] = m
            taken |= m
        out[PART_NAMES.index("skin")] = f["face_oval"] & ~taken & ~f["mouth"] & below_brows(pts, size, t)
        return out


def below_brows(pts: np.ndarray, size: int, topo: _Topology | None = None) -> np.ndarray:
    """The forehead cut: pixels at or below the polyline through both upper brow contours (landmarks
    `pts` in crop coordinates); per column, linear between points, held level beyond the lateral ends."""
    topo = topo or contour_topology()
    right, left = (pts[list(ids)] for ids in topo.brow_tops)
    line = np.concatenate([right, left[::-1]])       # lateral R -> medial R -> medial L -> lateral L
    line = line[np.argsort(line[:, 0], kind="stable")]
    cut = np.interp(np.arange(size, dtype=np.float64), line[:, 0], line[:, 1])
    return np.arange(size, dtype=np.float64)[:, None] >= cut[None, :]


def close_eyelids(landmarks_px, amount: float = 1.0, sides=("left", "right")) -> np.ndarray:
    """Landmarks with the upper-lid points moved `amount` of the way onto their lower-lid partners
    (a synthetic blink, for tests and demos)."""
    out = np.array(landmarks_px, np.float64, copy=True)
    for side in sides:
        up, lo = contour_topology().eye_lids[side]
        out[list(up)] += amount * (out[list(lo)] - out[list(up)])
    return out


# ---------------------------------------------------------------- face-parser engine

class ParserSegmenter:
    """BiSeNetV2 face parser (CelebAMask-HQ, 19 classes) as an 8-part segmentation engine.

    backend: None / "torch" / "cpu" (CPU), "cuda", a torch.device or an engine backend object (its
    ``device``). The network is the torch port `engine.networks.bisenet.BiSeNetV2` built from `path`
    (default: the shared faceparse asset; any BiSeNetV2 parser file of the same architecture works).

    Steps: parser crop (`parser_crop`: the landmark box x `parser_scale`, rotated with the eye line,
    moved up by `parser_shift` x side), bilinear resample to the network size, x / 127.5 - 1, network,
    logits resampled bilinearly onto the output crop (`face_crop`, the same crop as
    `LandmarkSegmenter`), argmax, classes -> parts. Pixels outside the parser crop get no part.

    Sides: the shipped network's l_*/r_* classes do NOT follow one convention (measured on 8 real
    faces from the shared media: l_brow/l_eye/l_ear fell on the image's left on 3 and on its right on
    5; consistent within a face). So by default eye and brow pixels are taken side-less (l_* or r_*)
    and given to the subject's left or right part by the nearer landmark eye / brow centre.
    ``trust_parser_sides=True`` uses the classes' own sides instead (l_* = subject's right), for
    checkpoints that are known to keep them.

    Skin gets the same forehead cut as the landmark engine (PRDL removes the forehead above the brows
    from the parser's skin too); glasses, ears, hair, neck, inner mouth etc. map to no part.
    """

    def __init__(self, backend=None, path: str | Path | None = None, crop_scale: float = CROP_SCALE,
                 parser_scale: float = PARSER_SCALE, parser_shift: float = PARSER_SHIFT,
                 trust_parser_sides: bool = False):
        from engine.networks.bisenet import load_bisenet

        self.device = _device_of(backend)
        self.net = load_bisenet(path).to(self.device).eval()
        self.source = f"bisenetv2:{self.net.source_name}"
        self.net_path = self.net.source_path
        self.crop_scale, self.parser_scale, self.parser_shift = crop_scale, parser_scale, parser_shift
        self.trust_parser_sides = trust_parser_sides
        self.input_size = self.net.input_size
        self.topo = contour_topology()

    def parser_crop(self, landmarks_px) -> Roi:
        return face_crop(landmarks_px, self.parser_scale, self.parser_shift)

    def parser_input(self, image_rgb, roi: Roi):
        """[1, 3, N, N] network input in [-1, 1]: the crop sampled bilinearly at its pixel centres
        (zeros, i.e. black, outside the image)."""
        import torch.nn.functional as F

        img = _image_tensor(image_rgb, self.device)
        grid = _crop_grid(roi, self.input_size, img.shape[-2:], self.device)
        x = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return x * (1.0 / 127.5) - 1.0

    def classes(self, image_rgb, landmarks_px):
        """(class map [N, N] long on the device, parser crop Roi): the raw 19-class parse."""
        import torch

        roi = self.parser_crop(landmarks_px)
        with torch.inference_mode():
            logits = self.net(self.parser_input(image_rgb, roi))
        return logits[0].argmax(0), roi

    def output_classes(self, image_rgb, landmarks_px, size: int = 128) -> tuple[np.ndarray, Roi]:
        """(S, S) int64 parser classes on the output crop's pixels (-1 outside the parser crop)."""
        import torch
        import torch.nn.functional as F

        lm = np.asarray(landmarks_px, np.float64)[:, :2]
        roi, out_roi = self.parser_crop(lm), face_crop(lm, self.crop_scale)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
        pxy = image_to_crop(crop_to_image(np.stack([xs, ys], -1), out_roi, size), roi, self.input_size)
        n = self.input_size
        with torch.inference_mode():
            # the graph's own x8 resize ends at the network size; sampling those logits is the exact
            # composition (bilinear of the graph's bilinear)
            logits = self.net(self.parser_input(image_rgb, roi))                    # [1, 19, N, N]
            g = torch.as_tensor(pxy * (2.0 / (n - 1)) - 1.0, dtype=torch.float32, device=self.device)[None]
            cls = F.grid_sample(logits, g, mode="bilinear", padding_mode="border", align_corners=True)[0]
            cls = cls.argmax(0).cpu().numpy()
        cls[((pxy < -0.5) | (pxy > n - 0.5)).any(-1)] = -1
        return cls, out_roi

    def __call__(self, image_rgb, landmarks_px, size: int = 128) -> PartMasks:
        cls, out_roi = self.output_classes(image_rgb, landmarks_px, size)
        pts = image_to_crop(np.asarray(landmarks_px, np.float64)[:, :2], out_roi, size)
        masks = np.zeros((len(PART_NAMES), size, size), bool)
        P = PART_NAMES.index
        if self.trust_parser_sides:
            for c, part in PARSER_TO_PART.items():
                masks[P(part)] = cls == c
        else:
            for c, part in PARSER_TO_PART.items():
                if part in ("skin", "nose", "upper_lip", "lower_lip"):
                    masks[P(part)] = cls == c
            ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
            t = self.topo
            for kind, classes in (("eye", (4, 5)), ("brow", (2, 3))):
                sel = np.isin(cls, classes)
                cl, cr = pts[t.polys[f"left_{kind}"]].mean(0), pts[t.polys[f"right_{kind}"]].mean(0)
                nearer_left = (xs - cl[0]) ** 2 + (ys - cl[1]) ** 2 < (xs - cr[0]) ** 2 + (ys - cr[1]) ** 2
                masks[P(f"left_{kind}")] = sel & nearer_left
                masks[P(f"right_{kind}")] = sel & ~nearer_left
        masks[P("skin")] &= below_brows(pts, size, self.topo)
        return PartMasks(masks, out_roi, self.source)

    def segment(self, image_rgb, landmarks_px, size: int = 128) -> PartMasks:
        return self(image_rgb, landmarks_px, size)


def _device_of(backend):
    import torch

    if backend is None or backend in ("torch", "cpu", "onnxruntime"):
        return torch.device("cpu")
    if backend in ("cuda", "tensorrt"):
        return torch.device("cuda")
    if isinstance(backend, (str, torch.device)):
        return torch.device(backend)
    dev = getattr(backend, "device", None)  # an engine backend object
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _image_tensor(image_rgb, device):
    import torch

    if isinstance(image_rgb, torch.Tensor):
        t = image_rgb.to(device)
        return (t.permute(2, 0, 1) if t.shape[-1] == 3 and t.shape[0] != 3 else t).float()
    return torch.from_numpy(np.ascontiguousarray(image_rgb)).to(device).permute(2, 0, 1).float()


def _crop_grid(roi: Roi, size: int, hw, device):
    """grid_sample grid (align_corners=True) sampling the image at the square crop's pixel centres."""
    import torch

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    xy = crop_to_image(np.stack([xs, ys], -1), roi, size)
    H, W = int(hw[0]), int(hw[1])
    g = np.stack([xy[..., 0] * (2.0 / max(W - 1, 1)) - 1.0, xy[..., 1] * (2.0 / max(H - 1, 1)) - 1.0], -1)
    return torch.as_tensor(g, dtype=torch.float32, device=device)[None]
