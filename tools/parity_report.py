"""Print parity figures of the PyTorch face-network ports against LiteRT, and forward timings.

    FACESTREAM_ASSETS=/work/shared/assets python tools/parity_report.py [--threads 2] [--runs 200]

Parity: the same input tensor goes to both runtimes (detector: letterboxed image; landmarks and
attention: the face crop from the torch detector's ROI; iris: the two eye crops from the torch 468
landmarks). Landmark differences are in pixels at the network input size (128/192/64) and in image
pixels. Timing: median and p90 of single forwards (batch 1, iris batch 2 as used per face), torch
with torch.set_num_threads(threads), LiteRT with XNNPACK and num_threads=threads, run one after the
other so their thread pools do not compete.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.assets import find_asset  # noqa: E402
from engine.networks import preprocess as pp  # noqa: E402
from engine.networks.face_detector import load_face_detector  # noqa: E402
from engine.networks.face_landmarks import LEFT_EYE_IDX, LIPS_IDX, RIGHT_EYE_IDX, load_attention_mesh, load_face_landmarks  # noqa: E402
from engine.networks.iris import load_iris  # noqa: E402

DEFAULT_IMAGES = ("d3d_000002.jpg", "3ddfa2_JianzhuGuo.jpg", "d3d_000031.jpg", "3ddfa2_trump_hillary.jpg",
                  "fr_alex-lacamoire.png", "liveportrait_img_d38.jpg")
FILES = {"detector": "face_detection_short_range.tflite", "landmarks": "face_landmark.tflite",
         "iris": "iris_landmark.tflite", "attention": "face_landmark_with_attention.tflite"}
SHAPES = {"detector": (1, 3, 128, 128), "landmarks": (1, 3, 192, 192), "iris": (2, 3, 64, 64),
          "attention": (1, 3, 192, 192)}


def interpreter(key: str, threads: int):
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=str(find_asset(f"mediapipe_models/{FILES[key]}")), num_threads=threads)
    it.allocate_tensors()
    return it


def run_litert(it, x: torch.Tensor) -> dict[str, np.ndarray]:
    outs = []
    for i in range(x.shape[0]):  # the tflite graphs have batch 1
        it.set_tensor(it.get_input_details()[0]["index"], x[i:i + 1].permute(0, 2, 3, 1).contiguous().numpy())
        it.invoke()
        outs.append({d["name"]: it.get_tensor(d["index"]).copy() for d in it.get_output_details()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def stats(fn, runs: int, warmup: int = 20) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3, ts[int(len(ts) * 0.9)] * 1e3


def timing(nets: dict, threads: int, runs: int) -> None:
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    inputs = {k: torch.from_numpy(rng.random(s, dtype=np.float32)) for k, s in SHAPES.items()}
    print(f"\n## Forward timing (ms, median / p90 over {runs} runs; {threads} threads; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs)\n")
    print("| net | input | torch CPU | LiteRT XNNPACK |")
    print("|---|---|---|---|")
    rows = {}
    with torch.inference_mode():
        for k, net in nets.items():
            rows[k] = [stats(lambda: net(inputs[k]), runs)]
    for k in nets:
        if k == "attention":
            rows[k].append(None)
            continue
        it = interpreter(k, threads)
        x = inputs[k]
        rows[k].append(stats(lambda: run_litert(it, x), runs))
    for k, (t, l) in rows.items():
        lit = "n/a (custom ops)" if l is None else f"{l[0]:.2f} / {l[1]:.2f}"
        print(f"| {k} | {'x'.join(map(str, SHAPES[k]))} | {t[0]:.2f} / {t[1]:.2f} | {lit} |")


def parity(nets: dict, media: Path, images: list[str]) -> None:
    from PIL import Image
    its = {k: interpreter(k, 1) for k in ("detector", "landmarks", "iris")}
    print("\n## Parity vs LiteRT (same input tensor)\n")
    print("| image | detector: max \\|d score\\| / max kp diff (128-px) | 468 mesh: max raw diff / max / mean xy diff "
          "(192-px) / max img px | presence logit diff | iris: max / mean xy diff (64-px) / max img px | "
          "attention: iris centre vs IrisNet (img px) / refined lips+eyes vs 468 mean (192-px) |")
    print("|---|---|---|---|---|---|")
    worst = {"det_kp": 0.0, "mesh": 0.0, "iris": 0.0}
    for name in images:
        img = np.asarray(Image.open(media / name).convert("RGB"))
        x, info = pp.letterbox_detector_input(img)
        with torch.inference_mode():
            reg, cls = nets["detector"](x)
        ref = run_litert(its["detector"], x)
        dets = pp.decode_detections(reg, cls, info)
        rdets = pp.decode_detections(torch.from_numpy(ref["regressors"]), torch.from_numpy(ref["classificators"]), info)
        if not dets or len(dets) != len(rdets):
            print(f"| {name} | detections torch {len(dets)} vs LiteRT {len(rdets)} | | | | |")
            continue
        s = 128 / info.side
        d_score = max(abs(a.score - b.score) for a, b in zip(dets, rdets))
        d_kp = max(np.abs(a.keypoints - b.keypoints).max() * s for a, b in zip(dets, rdets))
        worst["det_kp"] = max(worst["det_kp"], d_kp)

        roi = pp.roi_from_detection(dets[0], img.shape[1], img.shape[0])
        crop = pp.crop_roi(img, roi)
        with torch.inference_mode():
            pts, pres = nets["landmarks"](crop)
            att, _ = nets["attention"](crop)
        r = run_litert(its["landmarks"], crop)
        rpts = r["conv2d_21"].reshape(1, 468, 3)
        raw = np.abs(pts.numpy() - rpts).max()
        dxy = np.linalg.norm(pts.numpy()[0, :, :2] - rpts[0, :, :2], axis=1)
        img_scale = roi.w / pp.LANDMARK_SIZE
        worst["mesh"] = max(worst["mesh"], dxy.max())
        d_pres = abs(pres.item() - r["conv2d_31"].item())

        P = pp.project_landmarks(pts[0], roi, pp.LANDMARK_SIZE)
        eyes, rois = pp.crop_eyes(img, P)
        with torch.inference_mode():
            cont, iris = nets["iris"](eyes)
        ri = run_litert(its["iris"], eyes)
        t_all = torch.cat([cont, iris], dim=1).numpy()
        r_all = np.concatenate([ri["output_eyes_contours_and_brows"].reshape(2, 71, 3),
                                ri["output_iris"].reshape(2, 5, 3)], axis=1)
        dxy_i = np.linalg.norm(t_all[..., :2] - r_all[..., :2], axis=-1)
        worst["iris"] = max(worst["iris"], dxy_i.max())
        iris_img = max(dxy_i[k].max() * rois[k].w / pp.IRIS_SIZE for k in range(2))

        A = pp.project_landmarks(att[0], roi, pp.LANDMARK_SIZE)
        centres = [pp.project_eye_landmarks(iris[k], rois[k], flipped=(k == 1))[0, :2] for k in range(2)]
        d_centre = [float((A[i, :2] - c).norm()) for i, c in zip((468, 473), centres)]
        refined = list(LIPS_IDX) + list(LEFT_EYE_IDX) + list(RIGHT_EYE_IDX)
        d_ref = float((att[0, refined, :2] - pts[0, refined, :2]).norm(dim=1).mean())
        print(f"| {name} | {d_score:.1e} / {d_kp:.1e} | {raw:.1e} / {dxy.max():.1e} / {dxy.mean():.1e} / "
              f"{dxy.max() * img_scale:.1e} | {d_pres:.1e} | {dxy_i.max():.1e} / {dxy_i.mean():.1e} / {iris_img:.1e} | "
              f"{d_centre[0]:.2f}, {d_centre[1]:.2f} / {d_ref:.2f} |")
    print(f"\nworst: detector keypoints {worst['det_kp']:.1e} px (128), 468 mesh {worst['mesh']:.1e} px (192), "
          f"iris {worst['iris']:.1e} px (64)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--media", type=Path, default=None, help="folder with the test images "
                    "(default: $FACESTREAM_ASSETS/media)")
    ap.add_argument("--images", nargs="*", default=list(DEFAULT_IMAGES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    media = args.media or Path(os.environ.get("FACESTREAM_ASSETS", "")) / "media"
    nets = {"detector": load_face_detector(), "landmarks": load_face_landmarks(), "iris": load_iris(),
            "attention": load_attention_mesh()}
    if not args.skip_timing:
        timing(nets, args.threads, args.runs)
    if media.is_dir():
        parity(nets, media, args.images)
    else:
        print(f"\n(no parity: media folder {media} not found; set FACESTREAM_ASSETS or --media)")


if __name__ == "__main__":
    main()
