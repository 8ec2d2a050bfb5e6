"""Learn where MediaPipe's landmarks sit on the ICT face, from real video (the landmark embedding).

    FACESTREAM_ASSETS=/path/to/assets python tools/fit_landmark_offsets.py   # writes engine/weights/landmark_offsets.npz

The correspondence of the 468 mesh landmarks is first found geometrically (MediaPipe's canonical mesh aligned
to the ICT neutral face, engine/face_topology.py). On real faces MediaPipe places some points elsewhere
(around the eyes and along the jaw), and a linear face model then explains the difference with expressions
(eyeWide, jawLeft + jawRight at rest). This script estimates one constant 3D offset per landmark in the face
model's frame: alternately fit pose, identity and expression to frames of real videos with the current
offsets, and move each offset by the median residual, back-projected into the model frame. Only the fit
videos are used; the held-out videos report what the offsets change there.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.face_model import OFFSETS_PATH, FaceModel  # noqa: E402
from engine.fitting import FitWeights  # noqa: E402
from engine.geometry import Camera  # noqa: E402
from engine.media import MediaSource  # noqa: E402
from engine.pack import Pack  # noqa: E402
from engine.regressor import Regressor  # noqa: E402

FIT = ("liveportrait_d0.mp4", "liveportrait_d10.mp4", "liveportrait_d14.mp4", "pcavs_vox_620900105.mp4",
       "retalking_face4.mp4", "tps_driving.mp4")
HELD_OUT = ("liveportrait_d3.mp4", "liveportrait_d11.mp4", "liveportrait_d13.mp4", "liveportrait_d18.mp4",
            "sadtalker_WDA_KatieHill_000.mp4", "3ddfa_obama.mp4")
FOVS = (20.0, 30.0, 45.0, 60.0)
ESTIMATE_L1, ESTIMATE_L2 = 0.1, 0.2
N_MESH = 468


def video_landmarks(pack: Pack, path: Path, n: int) -> tuple[list[np.ndarray], tuple[int, int]]:
    source = MediaSource(path)
    tracker = pack.tracker()
    frames = [(f.rgb, f.index, f.pts) for f in source.frames()]
    keep = set(np.linspace(0, len(frames) - 1, n).astype(int).tolist())
    out = []
    for rgb, i, pts in frames:
        s = tracker.process(rgb, i, pts=pts, t_seconds=pts)
        if s.face and i in keep:
            out.append(s.landmarks.copy())
    return out, frames[0][0].shape[:2]


def fit_video(reg: Regressor, lms: list[np.ndarray], cam: Camera):
    """Sequential fits with the identity refined over all frames; -> fits, residuals in the model frame."""
    ident = np.zeros(reg.model.n_id)
    fits = []
    for _ in range(2):  # second pass with the identity from the first
        prev = None
        fits = []
        for lm in lms:
            r = reg.regress(lm, cam, ident, prev, fit_identity=True)
            prev = r.fit
            fits.append(r.fit)
        ident = np.mean([f.identity for f in fits], axis=0)
    res = []
    for lm, f in zip(lms, fits):
        pts = reg.fitter.model_points(ident, f.expression) @ f.rotation_cam.T + f.translation
        scale = cam.fx / f.translation[2]
        r2 = (lm[:N_MESH, :2] - cam.project(pts)) / scale  # cm at the face, camera x right / y down
        r3 = np.column_stack([r2, np.zeros(len(r2))]) @ f.rotation_cam  # into the model frame
        res.append(r3)
    rms = float(np.mean([np.sqrt(np.mean(np.sum(r ** 2, 1))) for r in res]))
    return fits, np.array(res), rms


def rest_summary(fits, names) -> dict:
    e = np.median([f.expression for f in fits], axis=0)
    top = np.argsort(-e)[:4]
    return {names[i]: round(float(e[i]), 2) for i in top}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=30, help="frames sampled per video")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OFFSETS_PATH)
    args = ap.parse_args()
    media = Path(os.environ["FACESTREAM_ASSETS"]) / "media"
    pack = Pack()
    model: FaceModel = pack.model
    data = {}
    for name in FIT + HELD_OUT:
        lms, (h, w) = video_landmarks(pack, media / name, args.frames)
        data[name] = (lms, w, h)
        print(f"{name}: {len(lms)} frames", flush=True)
    offsets = np.zeros((model.lm_neutral.shape[0], 3))
    base_neutral = model.lm_neutral.copy()

    def regressor_with(off, strict: bool = True):
        # while estimating, expressions get a strong sparsity prior, so that what every face shares is
        # taken up by the offsets rather than by expressions
        model.set_landmark_offsets(off)
        return Regressor(model, weights=FitWeights(exp_l1=ESTIMATE_L1, exp_l2=ESTIMATE_L2) if strict else None)

    def camera_for(reg, name):
        lms, w, h = data[name]
        best = None
        for fov in FOVS:
            cam = Camera.from_fov(w, h, fov)
            _, _, rms = fit_video(reg, lms[:8], cam)
            if best is None or rms < best[0]:
                best = (rms, cam)
        return best[1]

    reg = regressor_with(offsets, strict=False)
    cams = {name: camera_for(reg, name) for name in data}
    before = {name: rest_summary(fit_video(reg, data[name][0], cams[name])[0], model.exp_names) for name in HELD_OUT}
    for rnd in range(args.rounds):
        reg = regressor_with(offsets)
        all_res, rms_all = [], []
        for name in FIT:
            _, res, rms = fit_video(reg, data[name][0], cams[name])
            all_res.append(res)
            rms_all.append(rms)
        update = np.median(np.concatenate(all_res), axis=0)
        offsets[:N_MESH] += 0.8 * update
        print(f"round {rnd + 1}: fit-set landmark RMS {np.mean(rms_all):.3f} cm, "
              f"offset mean {np.linalg.norm(offsets[:N_MESH], axis=1).mean():.3f} cm", flush=True)
    reg = regressor_with(offsets, strict=False)
    print("\nheld-out videos, median expression over sampled frames (top 4 shapes):")
    for name in HELD_OUT:
        after = rest_summary(fit_video(reg, data[name][0], cams[name])[0], model.exp_names)
        print(f"  {name}: before {before[name]}\n  {' ' * len(name)}  after  {after}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, offsets=offsets.astype(np.float32), fit_videos=np.array(FIT),
                        base_digest=np.array(float(np.abs(base_neutral).sum())))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
