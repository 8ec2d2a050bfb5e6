"""Pre- and post-processing around the face networks, as MediaPipe does it (shared docs
mediapipe_models.md sections 1.3, 2.4-2.6, 4.4-4.6, 6.4). Pure torch: works on CPU or CUDA tensors.

Coordinates: image pixels with OpenCV conventions (pixel centres at integers, y down). A `Roi` is a
rotated rectangle in pixels; positive theta turns it clockwise on screen (MediaPipe's convention).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DETECTOR_SIZE = 128
LANDMARK_SIZE = 192
IRIS_SIZE = 64


# ---------------------------------------------------------------- data types

@dataclass
class Roi:
    """Rotated rectangle: centre (cx, cy) and size (w, h) in pixels, rotation theta in radians."""
    cx: float
    cy: float
    w: float
    h: float
    theta: float = 0.0


@dataclass
class Detection:
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    keypoints: np.ndarray                   # (6, 2) image pixels: r-eye, l-eye, nose, mouth, r-ear, l-ear


@dataclass
class LetterboxInfo:
    """Square of side `side` px centred on a `width` x `height` image, scaled to the detector input."""
    width: int
    height: int
    side: float


# ---------------------------------------------------------------- image handling

def as_image_tensor(image, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 [3,H,W] with values 0..255. Accepts a numpy HWC array (uint8 or float 0..255), or a
    torch tensor [3,H,W] (CHW) / [H,W,3] (HWC)."""
    if isinstance(image, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays (PIL, av) are fine: nothing writes to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(image))
    else:
        t = image
    if t.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {tuple(t.shape)}")
    if isinstance(image, np.ndarray) or (t.shape[0] != 3 and t.shape[-1] == 3):
        t = t.permute(2, 0, 1)
    if device is not None:
        t = t.to(device)
    return t.float() if t.dtype != torch.float32 else t


def _affine_grid(rois: list[Roi], out_w: int, out_h: int, img_w: int, img_h: int, half_pixel: bool,
                 device, dtype=torch.float32) -> torch.Tensor:
    """Sampling grid [1, N*out_h, out_w, 2] (normalised for grid_sample, align_corners=True).

    Output pixel (u, v) samples the image at  c + Rot(theta) @ ((a/out_w - 0.5) w, (b/out_h - 0.5) h)
    with (a, b) = (u, v) for MediaPipe's ImageToTensor (corner aligned, section 1.3), or
    (u + 0.5, v + 0.5) minus 0.5 px afterwards for the half-pixel-corrected ImageCropping path (6.4).
    """
    off = 0.5 if half_pixel else 0.0
    u = (torch.arange(out_w, device=device, dtype=torch.float64) + off) / out_w - 0.5
    v = (torch.arange(out_h, device=device, dtype=torch.float64) + off) / out_h - 0.5
    p = torch.tensor([[r.cx, r.cy, r.w, r.h, math.cos(r.theta), math.sin(r.theta)] for r in rois],
                     device=device, dtype=torch.float64)
    cx, cy, w, h, c, s = (p[:, i, None, None] for i in range(6))
    du = u[None, None, :] * w           # [N,1,W]
    dv = v[None, :, None] * h           # [N,H,1]
    x = cx + c * du - s * dv - off      # [N,H,W]
    y = cy + s * du + c * dv - off
    gx = 2.0 * x / max(img_w - 1, 1) - 1.0
    gy = 2.0 * y / max(img_h - 1, 1) - 1.0
    return torch.stack([gx, gy], dim=-1).reshape(1, len(rois) * out_h, out_w, 2).to(dtype)


def _warp(img: torch.Tensor, rois: list[Roi], out_w: int, out_h: int, half_pixel: bool,
          padding_mode: str, quantize: bool) -> torch.Tensor:
    """Bilinear warp of img [3,H,W] into [N,3,out_h,out_w]; one grid_sample call for all rois.
    quantize=True rounds to integer levels like OpenCV's uint8 warp output in MediaPipe (this moves
    the reference detection score from 0.9304 to MediaPipe's 0.9296)."""
    _, H, W = img.shape
    grid = _affine_grid(rois, out_w, out_h, W, H, half_pixel, img.device)
    out = F.grid_sample(img[None], grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    if quantize:
        out = out.round_()
    n = len(rois)
    return out.reshape(3, n, out_h, out_w).transpose(0, 1)


# ---------------------------------------------------------------- detector input / output

def letterbox_detector_input(image, size: int = DETECTOR_SIZE,
                             quantize: bool = True) -> tuple[torch.Tensor, LetterboxInfo]:
    """Whole image letterboxed (aspect kept, black pad) into [1,3,size,size] RGB in [-1,1]
    (pad = -1), as FaceDetectionShortRange's ImageToTensor (BORDER_ZERO)."""
    img = as_image_tensor(image)
    _, H, W = img.shape
    side = float(max(W, H))
    roi = Roi(W / 2.0, H / 2.0, side, side, 0.0)
    x = _warp(img, [roi], size, size, half_pixel=False, padding_mode="zeros", quantize=quantize)
    return (x * (1.0 / 127.5) - 1.0).contiguous(), LetterboxInfo(W, H, side)


_ANCHORS: dict[tuple, torch.Tensor] = {}


def detector_anchors(device=None) -> torch.Tensor:
    """[896,2] anchor centres (normalised) of the short-range model: 16x16 grid x 2, then 8x8 x 6."""
    key = (str(device),)
    if key not in _ANCHORS:
        out = []
        for grid, per_cell in ((16, 2), (8, 6)):
            ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
            c = torch.stack([(xs + 0.5) / grid, (ys + 0.5) / grid], dim=-1).reshape(-1, 1, 2)
            out.append(c.expand(-1, per_cell, 2).reshape(-1, 2))
        _ANCHORS[key] = torch.cat(out).to(device=device, dtype=torch.float32)
    return _ANCHORS[key]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a [4] with boxes b [M,4] (x0,y0,x1,y1)."""
    ix = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, iou_thresh: float = 0.3):
    """MediaPipe WEIGHTED non-max suppression. Returns [(score, box[4], keypoints[K,2])]."""
    order = np.argsort(-scores, kind="stable")
    out = []
    while order.size:
        top = order[0]
        ious = _iou(boxes[top], boxes[order])
        cand = order[ious > iou_thresh]
        if cand.size == 0:  # degenerate (zero-area) top box: keep it alone
            cand = order[:1]
        wts = scores[cand][:, None]
        total = wts.sum()
        box = (boxes[cand] * wts).sum(0) / total
        kps = (keypoints[cand] * wts[:, :, None]).sum(0) / total
        out.append((float(scores[top]), box, kps))
        order = order[~np.isin(order, cand)]
    return out


def decode_detections(regressors: torch.Tensor, logits: torch.Tensor, info: LetterboxInfo,
                      min_score: float = 0.5, iou_thresh: float = 0.3) -> list[Detection]:
    """Raw detector outputs ([1,896,16], [1,896,1] or unbatched) -> detections in image pixels,
    sorted by score. Decoding per section 2.5 (XYWH, no exp, anchors w=h=1), weighted NMS in the
    letterboxed frame, then un-letterbox (2.6)."""
    reg = regressors.reshape(-1, 16).float()
    if reg.shape[0] != 896:
        raise ValueError("decode_detections takes one image's outputs ([1,896,16])")
    scores = torch.sigmoid(logits.reshape(-1).float().clamp(-100.0, 100.0))
    keep = scores >= min_score
    anchors = detector_anchors(reg.device)
    r, a, sc = reg[keep] / DETECTOR_SIZE, anchors[keep], scores[keep]
    ctr = r[:, 0:2] + a
    wh = r[:, 2:4]
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    kps = r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]
    valid = (wh >= 0).all(dim=1)  # boxes with negative width or height are dropped
    boxes, kps, sc = boxes[valid].cpu().double().numpy(), kps[valid].cpu().double().numpy(), sc[valid].cpu().double().numpy()
    dets = []
    L, W, H = info.side, info.width, info.height
    for score, box, kp in weighted_nms(sc, boxes, kps, iou_thresh):
        bx = W / 2.0 + (box[[0, 2]] - 0.5) * L
        by = H / 2.0 + (box[[1, 3]] - 0.5) * L
        kpx = np.stack([W / 2.0 + (kp[:, 0] - 0.5) * L, H / 2.0 + (kp[:, 1] - 0.5) * L], axis=1)
        dets.append(Detection(score, (float(bx.min()), float(by.min()), float(bx.max()), float(by.max())), kpx))
    return dets


# ---------------------------------------------------------------- face ROI

def _normalize_angle(a: float) -> float:
    return a - 2 * math.pi * math.floor((a + math.pi) / (2 * math.pi))


def _square_roi(x0: float, y0: float, x1: float, y1: float, theta: float, scale: float) -> Roi:
    side = max(x1 - x0, y1 - y0) * scale
    return Roi((x0 + x1) / 2.0, (y0 + y1) / 2.0, side, side, _normalize_angle(theta))


def roi_from_detection(det: Detection, image_w: int | None = None, image_h: int | None = None,
                       scale: float = 1.5) -> Roi:
    """Section 4.4: box centre, rotation of the eye line (keypoint 0 -> 1, pixels), square on the long
    side, x1.5. (image_w/h are accepted for symmetry; pixel inputs need no normalisation.)"""
    kp = np.asarray(det.keypoints, dtype=np.float64)
    theta = math.atan2(kp[1, 1] - kp[0, 1], kp[1, 0] - kp[0, 0])
    return _square_roi(*det.box, theta, scale)


def roi_from_landmarks(points_px, start_idx: int = 33, end_idx: int = 263, scale: float = 1.5) -> Roi:
    """Section 4.6: axis-aligned box of all landmarks, rotation landmark 33 -> 263, square, x1.5."""
    p = torch.as_tensor(points_px)[:, :2].detach().double().cpu()
    lo, hi = p.min(dim=0).values.tolist(), p.max(dim=0).values.tolist()
    d = (p[end_idx] - p[start_idx]).tolist()
    return _square_roi(lo[0], lo[1], hi[0], hi[1], math.atan2(d[1], d[0]), scale)


def crop_roi(image, roi: Roi, size: int = LANDMARK_SIZE, quantize: bool = True) -> torch.Tensor:
    """Face crop for the landmark models: [1,3,size,size] RGB in [0,1]; corner-aligned sampling
    (section 1.3), replicate border. `image`: float [3,H,W] 0..255, uint8, or numpy HWC."""
    return crop_rois(image, [roi], size, quantize)


def crop_rois(image, rois: list[Roi], size: int = LANDMARK_SIZE, quantize: bool = True) -> torch.Tensor:
    """Batched crop_roi: [N,3,size,size] in [0,1], one grid_sample for all rois."""
    img = as_image_tensor(image)
    return _warp(img, rois, size, size, False, "border", quantize) * (1.0 / 255.0)


def crop_faces(items: list[tuple[torch.Tensor, Roi]], size: int = LANDMARK_SIZE, quantize: bool = True) -> torch.Tensor:
    """Face crops from many frames, [N,3,size,size] in [0,1], in item order; equal to crop_roi per item.
    Frames of one shape (a server's streams usually share a resolution) are stacked and sampled with one
    grid_sample call, so the per-face cost on a GPU is a slice of one kernel rather than a dozen small ones.
    `items`: (image as from as_image_tensor: float [3,H,W] 0..255, roi)."""
    groups: dict[tuple, list[int]] = {}
    for i, (image, _roi) in enumerate(items):
        groups.setdefault((tuple(image.shape), image.device, image.dtype), []).append(i)
    out = None
    for (shape, device, _dtype), idx in groups.items():
        _, H, W = shape
        frames: dict[int, int] = {}  # id(image) -> row in the stack
        stack, rows = [], []
        for i in idx:
            key = id(items[i][0])
            if key not in frames:
                frames[key] = len(stack)
                stack.append(items[i][0])
            rows.append(frames[key])
        grid = _affine_grid([items[i][1] for i in idx], size, size, W, H, False, device)
        grid = grid.reshape(len(idx), size, size, 2)
        if device.type == "cuda":  # stacking the frames is cheap on the device and saves launches
            imgs = torch.stack(stack)
            if len(stack) != len(idx):  # several faces in one frame: one sampled copy per face
                imgs = imgs.index_select(0, torch.tensor(rows, device=device))
            crops = F.grid_sample(imgs.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
        else:  # on a CPU copying whole frames costs more than it saves: sample each frame in place
            crops = grid.new_empty((len(idx), 3, size, size))
            rows_t = torch.tensor(rows)
            for r, img in enumerate(stack):
                sel = (rows_t == r).nonzero().reshape(-1)
                g = grid.index_select(0, sel).reshape(1, -1, size, 2)
                c = F.grid_sample(img[None].float(), g, mode="bilinear", padding_mode="border", align_corners=True)
                crops[sel] = c.reshape(3, len(sel), size, size).transpose(0, 1)
        if quantize:
            crops = crops.round_()
        crops = crops * (1.0 / 255.0)
        if out is None:
            if len(groups) == 1:
                return crops
            out = crops.new_empty((len(items), 3, size, size))
        out[torch.tensor(idx, device=device)] = crops
    return out


def project_landmarks(points: torch.Tensor, roi: Roi, size: float) -> torch.Tensor:
    """Crop-unit points [..., N, 3] (x, y, z in `size`-px crop units) -> image pixels (section 4.5).
    z is scaled like x: z_px = z / size * roi.w. Accepts [..., N, 2] too."""
    return _project_crop_points(points, (roi.cx, roi.cy, roi.w, roi.h, math.cos(roi.theta), math.sin(roi.theta)),
                                size)


def project_landmarks_batch(points: torch.Tensor, rois: list[Roi], size: float) -> torch.Tensor:
    """`project_landmarks` for a batch: points [B, N, 3] with one roi each -> image pixels [B, N, 3]."""
    p = torch.tensor([[r.cx, r.cy, r.w, r.h, math.cos(r.theta), math.sin(r.theta)] for r in rois],
                     dtype=points.dtype)[:, :, None]  # [B, 6, 1]
    return _project_crop_points(points, p.unbind(1), size)


def _project_crop_points(points: torch.Tensor, roi_params, size: float) -> torch.Tensor:
    """The rotated-box map of `project_landmarks`; ``roi_params`` = (cx, cy, w, h, cos, sin), numbers or tensors
    that broadcast against points[..., 0]."""
    cx, cy, w, h, c, s = roi_params
    xn = points[..., 0] / size - 0.5
    yn = points[..., 1] / size - 0.5
    cols = [cx + (c * xn - s * yn) * w, cy + (s * xn + c * yn) * h]
    if points.shape[-1] > 2:
        cols.append(points[..., 2] / size * w)
    return torch.stack(cols, dim=-1)


# ---------------------------------------------------------------- iris (eye crops)

# Eye corner pairs (first -> second) of the face mesh (section 6.4): the image-left eye (33 -> 133)
# is cropped as is; the image-right eye (362 -> 263) is mirrored before the iris model.
EYE_CORNERS = ((33, 133), (362, 263))


def roi_from_eye_corners(p0, p1, scale: float = 2.3) -> Roi:
    """IrisLandmarkLandmarksToRoi: box of the 2 points, rotation p0 -> p1, square on the long side, x2.3."""
    p0 = [float(v) for v in p0[:2]]
    p1 = [float(v) for v in p1[:2]]
    theta = math.atan2(p1[1] - p0[1], p1[0] - p0[0])
    return _square_roi(min(p0[0], p1[0]), min(p0[1], p1[1]), max(p0[0], p1[0]), max(p0[1], p1[1]), theta, scale)


def _area_matrix(n_in: int, n_out: int, device) -> torch.Tensor:
    """[n_out, n_in] weights of OpenCV INTER_AREA shrinking: exact box-overlap averages."""
    s = n_in / n_out
    lo = torch.arange(n_out, device=device, dtype=torch.float64)[:, None] * s
    j = torch.arange(n_in, device=device, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(lo + s, j + 1) - torch.maximum(lo, j)).clamp(min=0)
    return (overlap / s).float()


def crop_eye(image, roi: Roi, flip: bool = False, size: int = IRIS_SIZE, quantize: bool = True) -> torch.Tensor:
    """Eye crop for the iris model, [1,3,size,size] RGB in [0,1] (section 6.4): the rotated rect is
    cut out at round(w) x round(h) px with half-pixel-centred bilinear sampling (replicate border),
    then resized to size x size (area filter when shrinking, bilinear when enlarging), then mirrored
    horizontally if `flip`."""
    img = as_image_tensor(image)
    cw, ch = max(int(round(roi.w)), 1), max(int(round(roi.h)), 1)
    x = _warp(img, [roi], cw, ch, True, "border", quantize)  # [1,3,ch,cw]
    if (cw, ch) != (size, size):
        if cw > size and ch > size:
            ay, ax = _area_matrix(ch, size, x.device), _area_matrix(cw, size, x.device)
            x = ay @ x @ ax.T
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        if quantize:
            x = x.round()
    if flip:
        x = x.flip(-1)
    return x * (1.0 / 255.0)


def crop_eyes(image, face_points_px) -> tuple[torch.Tensor, tuple[Roi, Roi]]:
    """Both eye crops from face-mesh points (pixels, [>=468, 2+]): returns ([2,3,64,64], (roi_a, roi_b));
    index 0 is the image-left eye (33/133), index 1 the image-right eye (362/263), mirrored."""
    img = as_image_tensor(image)
    pts = torch.as_tensor(face_points_px).detach().double().cpu()
    rois = tuple(roi_from_eye_corners(pts[i], pts[j]) for i, j in EYE_CORNERS)
    crops = torch.cat([crop_eye(img, rois[0], flip=False), crop_eye(img, rois[1], flip=True)])
    return crops, rois


def project_eye_landmarks(points: torch.Tensor, roi: Roi, flipped: bool, size: int = IRIS_SIZE) -> torch.Tensor:
    """Iris-model points [..., N, 3] in 64-px crop units -> image pixels; un-mirrors x (64 - x) first."""
    if flipped:
        points = torch.cat([size - points[..., :1], points[..., 1:]], dim=-1)
    return project_landmarks(points, roi, size)
