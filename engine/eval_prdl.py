"""`facestream eval-prdl`: does PRDL refinement recover expressions a weak regressor got wrong?

Synthetic faces with known coefficients (engine/synthetic.py) are rendered to ground-truth part masks
from the mesh's part labels; refinement starts from the degraded expression and a slightly wrong pose.
Reported per part: IoU before/after; expression error before/after (all shapes, and the deliberately
perturbed ones); pose error; iterations and milliseconds per face.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine.face_model import FaceModel
from engine.gaze import eye_look_mask
from engine.raster import render_labels
from engine.refine import PrdlRefiner, RefineConfig
from engine.synthetic import CASES, SyntheticFace, sample_face


SLIVER_PX = 10  # ground-truth part masks smaller than this (224 px images) are reported apart


@dataclass
class LabelCrop:
    """Ground-truth part labels in a square crop around the face (as the live segmenters crop), usable
    as refinement targets."""

    labels: np.ndarray  # (S, S) int8
    origin: tuple[int, int]  # image pixel of crop pixel (0, 0)

    @classmethod
    def around_face(cls, labels: np.ndarray, scale: float = 1.15) -> "LabelCrop":
        rows, cols = np.nonzero(labels >= 0)
        cy, cx = 0.5 * (rows.min() + rows.max()), 0.5 * (cols.min() + cols.max())
        side = int(np.ceil(scale * max(rows.max() - rows.min(), cols.max() - cols.min()))) + 1
        y0, x0 = int(round(cy - side / 2)), int(round(cx - side / 2))
        padded = np.full((side, side), -1, np.int8)
        ys, xs = slice(max(y0, 0), min(y0 + side, labels.shape[0])), slice(max(x0, 0), min(x0 + side, labels.shape[1]))
        padded[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = labels[ys, xs]
        return cls(padded, (x0, y0))

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def label_map(self) -> np.ndarray:
        return self.labels

    def to_crop(self, xy_image) -> np.ndarray:
        return np.asarray(xy_image, np.float64) - np.array(self.origin, np.float64)


def render_part_labels(model: FaceModel, face: SyntheticFace, rc: np.ndarray, t: np.ndarray,
                       expression: np.ndarray) -> np.ndarray:
    verts = model.vertices(face.identity, expression).astype(np.float64) @ rc.T + t
    uv = face.camera.project(verts)
    return render_labels(np.column_stack([uv, verts[:, 2]]), model.faces, model.part_labels,
                         face.camera.height, face.camera.width)


def _iou(a: np.ndarray, b: np.ndarray) -> float | None:
    union = np.logical_or(a, b).sum()
    return None if union == 0 else float(np.logical_and(a, b).sum() / union)


def _angle_deg(r1: np.ndarray, r2: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(r1.T @ r2) - 1) / 2, -1.0, 1.0))))


def evaluate(n_faces: int = 60, config: RefineConfig | None = None, seed: int = 0, size: int = 224) -> dict:
    model = FaceModel.load()
    fixed = eye_look_mask(model.n_exp)
    refiner = PrdlRefiner(model, config, fixed_exp=fixed)
    rng = np.random.default_rng(seed)
    parts = model.part_names
    iou_b = {p: [] for p in parts}
    iou_a = {p: [] for p in parts}
    # a closed eye's ground truth is a sliver of a few pixels, which a correctly closed eye misses entirely (IoU 0):
    # the same means over the parts with at least SLIVER_PX ground-truth pixels are reported beside the bar's
    big_b = {p: [] for p in parts}
    big_a = {p: [] for p in parts}
    mae_b, mae_a, pmae_b, pmae_a, pose_b, pose_a, ms, cpu_ms, iters = [], [], [], [], [], [], [], [], []
    ms_targets, ms_refine = [], []
    per_case: dict[str, list[tuple[float, float]]] = {c: [] for c in CASES}
    for i in range(n_faces):
        face = sample_face(model, CASES[i % len(CASES)], rng, size=size)
        gt = render_part_labels(model, face, face.rotation_cam, face.translation, face.expression)
        crop = LabelCrop.around_face(gt)
        refiner.prepare_identity(face.identity)  # once per person when tracking (identity is held), not per frame
        t0, c0 = time.perf_counter(), time.thread_time()
        targets = refiner.targets(crop)
        t1 = time.perf_counter()
        res = refiner.refine(targets, face.camera, face.rotation_cam_start, face.translation_start, face.perturbed,
                             face.identity, exp_prior=face.perturbed)
        t2 = time.perf_counter()
        ms.append((t2 - t0) * 1e3)
        ms_targets.append((t1 - t0) * 1e3)
        ms_refine.append((t2 - t1) * 1e3)
        cpu_ms.append((time.thread_time() - c0) * 1e3)
        iters.append(res.iterations)
        before = render_part_labels(model, face, face.rotation_cam_start, face.translation_start, face.perturbed)
        after = render_part_labels(model, face, res.rotation_cam, res.translation, res.expression)
        for k, p in enumerate(parts):
            n_gt = int((gt == k).sum())
            if n_gt:
                for store, big, img in ((iou_b, big_b, before), (iou_a, big_a, after)):
                    v = _iou(gt == k, img == k)
                    if v is not None:
                        store[p].append(v)
                        if n_gt >= SLIVER_PX:
                            big[p].append(v)
        err_b = np.abs(face.perturbed - face.expression)[~fixed]
        err_a = np.abs(res.expression - face.expression)[~fixed]
        mae_b.append(err_b.mean())
        mae_a.append(err_a.mean())
        pm = face.perturbed_mask[~fixed]
        if pm.any():
            pmae_b.append(err_b[pm].mean())
            pmae_a.append(err_a[pm].mean())
            per_case[face.case].append((err_b[pm].mean(), err_a[pm].mean()))
        pose_b.append(_angle_deg(face.rotation_cam_start, face.rotation_cam))
        pose_a.append(_angle_deg(res.rotation_cam, face.rotation_cam))
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    cfg = refiner.config
    return {
        "faces": n_faces,
        "config": {"anchors": cfg.anchors, "points": cfg.points, "iterations": cfg.iterations,
                   "candidates": cfg.candidates},
        "iou_before": {p: round(mean(v), 4) for p, v in iou_b.items()},
        "iou_after": {p: round(mean(v), 4) for p, v in iou_a.items()},
        "mean_iou_before": round(mean([mean(v) for v in iou_b.values()]), 4),
        "mean_iou_after": round(mean([mean(v) for v in iou_a.values()]), 4),
        # (a part whose every mask is a sliver -- a closed eye on every face -- has no mean here)
        "mean_iou_before_no_slivers": round(mean([mean(v) for v in big_b.values() if v]), 4),
        "mean_iou_after_no_slivers": round(mean([mean(v) for v in big_a.values() if v]), 4),
        "slivers": sum(len(iou_a[p]) - len(big_a[p]) for p in parts),  # part instances under SLIVER_PX pixels
        "mae_before": round(mean(mae_b), 4),
        "mae_after": round(mean(mae_a), 4),
        "perturbed_mae_before": round(mean(pmae_b), 4),
        "perturbed_mae_after": round(mean(pmae_a), 4),
        "perturbed_mae_by_case": {c: [round(mean([b for b, _ in v]), 4), round(mean([a for _, a in v]), 4)]
                                  for c, v in per_case.items()},
        "pose_err_deg_before": round(mean(pose_b), 3),
        "pose_err_deg_after": round(mean(pose_a), 3),
        "iterations": round(mean(iters), 2),
        "ms_per_face": round(float(np.median(ms)), 3),
        "ms_per_face_p95": round(float(np.percentile(ms, 95)), 3),
        "cpu_ms_per_face": round(float(np.median(cpu_ms)), 3),  # this thread's CPU time: less load-sensitive
        "ms_targets": round(float(np.median(ms_targets)), 3),  # part masks -> target descriptors
        "ms_refine": round(float(np.median(ms_refine)), 3),  # the Levenberg-Marquardt solve
        "ms_refine_p95": round(float(np.percentile(ms_refine, 95)), 3),
    }


def format_report(r: dict) -> str:
    lines = [f"PRDL refinement on {r['faces']} synthetic faces  (anchors {r['config']['anchors']}x"
             f"{r['config']['anchors']}, {r['config']['points']} points/part, {r['config']['iterations']} iterations)",
             f"{'part':<12}{'IoU before':>12}{'IoU after':>12}"]
    for p in r["iou_before"]:
        lines.append(f"{p:<12}{r['iou_before'][p]:>12.3f}{r['iou_after'][p]:>12.3f}")
    lines += [f"{'mean':<12}{r['mean_iou_before']:>12.3f}{r['mean_iou_after']:>12.3f}",
              f"{'mean >=' + str(SLIVER_PX) + 'px':<12}{r['mean_iou_before_no_slivers']:>12.3f}"
              f"{r['mean_iou_after_no_slivers']:>12.3f}  ({r['slivers']} part masks under {SLIVER_PX} px left out: "
              "mostly closed eyes' slivers)",
              f"expression MAE (all shapes):       {r['mae_before']:.4f} -> {r['mae_after']:.4f}",
              f"expression MAE (perturbed shapes): {r['perturbed_mae_before']:.4f} -> {r['perturbed_mae_after']:.4f}"]
    for c, (b, a) in r["perturbed_mae_by_case"].items():
        lines.append(f"  {c:<18} {b:.4f} -> {a:.4f}")
    lines += [f"pose error (deg): {r['pose_err_deg_before']:.2f} -> {r['pose_err_deg_after']:.2f}",
              f"iterations {r['iterations']}, {r['ms_per_face']:.2f} ms per face (median; p95 {r['ms_per_face_p95']:.2f}; "
              f"thread CPU time {r['cpu_ms_per_face']:.2f}): targets {r['ms_targets']:.2f} + refinement "
              f"{r['ms_refine']:.2f} (p95 {r['ms_refine_p95']:.2f})"]
    return "\n".join(lines)
