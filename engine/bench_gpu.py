"""GPU engine benchmark: parity against the CPU, per-stage times, faces/s per batch size, and how many
simulated 30 fps streams one device holds through the batching scheduler.

    python -m engine.bench_gpu [--device cuda|cpu] [--backend cuda|tensorrt] [--out DIR]

`--device cpu` runs every step on the CPU (the cuda backend's bucketing path with graphs off stands in for
the device side) so the script can be checked end to end without a GPU; the figures are then CPU figures.
Writes bench_gpu.json and bench_gpu.txt to --out (default $OUT, else ./gpu_out). Bundled `bash bench/gpu.sh`
runs it with the GPU tests.

Parity tolerances (device vs the CPU ports, fp32 with TF32 off; fp16 TensorRT gets the looser column):
detector raw box/keypoint regressors in 128-px input units, face scores; landmarks in image pixels for the
same ROI; end to end (each frame tracked as a new track, so the ROI comes from the detector) ICT
expression coefficients (0..1), rotation in degrees and translation in cm.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TOL = {  # (fp32 cuda, fp16 tensorrt)
    # fp32 cuDNN sums the detector's 5x5 convolutions in another order than the CPU: 0.025 px / 1.9e-4 on an H200
    "detector_regressors_px": (0.05, 0.5),
    "detector_score": (5e-4, 5e-3),
    "landmarks_px": (0.02, 0.5),
    "landmark_score": (1e-4, 5e-3),
    "e2e_expression": (0.01, 0.05),
    "e2e_rotation_deg": (0.05, 0.5),
    "e2e_translation_cm": (0.01, 0.1),
}
VIDEOS = ("liveportrait_d0.mp4", "liveportrait_d3.mp4", "liveportrait_d10.mp4", "tps_driving.mp4",
          "pcavs_vox_620900105.mp4", "retalking_face4.mp4")
IMAGES = ("fr_two_people.jpg", "3ddfa2_trump_hillary.jpg", "d3d_000002.jpg", "3ddfa2_JianzhuGuo.jpg",
          "deepface_selfie-many-people.jpg")
REQUIRED = ("mediapipe_models/face_detection_short_range.tflite",
            "mediapipe_models/face_landmark_with_attention.tflite", "ict_facekit/ict_face_model.npz",
            "mediapipe/face_mesh_contours.json", "mediapipe/canonical_face_model.obj")


# ---------------------------------------------------------------- setup

def check_assets() -> Path:
    """The media folder; exits with a clear message when an asset the benchmark needs is missing."""
    from engine.assets import AssetMissingError, find_asset, search_roots

    missing = []
    for rel in REQUIRED:
        try:
            find_asset(rel)
        except AssetMissingError:
            missing.append(rel)
    media = None
    for root in search_roots():
        if (root / "media" / VIDEOS[0]).exists():  # a video file, or a folder of its frames (machines without PyAV)
            media = root / "media"
            break
    if media is None:
        missing.append(f"media/{VIDEOS[0]} (the shared media folder)")
    if missing:
        roots = ", ".join(str(r) for r in search_roots())
        sys.exit("bench_gpu: error: missing assets: " + "; ".join(missing) + f" (searched {roots}). Set "
                 "FACESTREAM_ASSETS to the shared assets folder and put the MediaPipe .tflite files under "
                 "<root>/mediapipe_models/ (e.g. copy ~/.cache/facestream/mediapipe_models into the assets root or "
                 "the user cache of the machine); the benchmark downloads nothing.")
    return media


def machine_info(device: str) -> dict:
    import torch

    from engine.backends import backend_status
    from engine.cli import machine_description

    info = {"cpu": machine_description(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "device": device, "backends": backend_status()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import cupy
        info["cupy"] = cupy.__version__
    except Exception as exc:  # noqa: BLE001 - informational
        info["cupy"] = f"unavailable ({type(exc).__name__})"
    info["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return info


def make_backend(device: str, backend: str):
    from engine.backends import CudaBackend, select_backend

    if device == "cpu":
        return CudaBackend(device="cpu", graphs=False)  # the bucketing/static-buffer path, eager, on CPU
    return select_backend(backend)


STILLS = ("liveportrait_img_d9.jpg", "liveportrait_img_d12.jpg", "liveportrait_img_d19.jpg", "liveportrait_img_d38.jpg",
          "liveportrait_img_s2.jpg", "liveportrait_img_s12.jpg")
FRAME_SOURCE = {"kind": "video"}


def _still_clip(media: Path, k: int, n: int) -> list[np.ndarray]:
    """Without PyAV: a clip from a still photo of a real face, shifted along a slow circle frame by frame."""
    from PIL import Image

    rgb = np.asarray(Image.open(media / STILLS[k % len(STILLS)]).convert("RGB"))
    out = []
    for i in range(n):
        dx, dy = int(round(6 * np.cos(i / 8))), int(round(4 * np.sin(i / 8)))
        out.append(np.ascontiguousarray(np.roll(rgb, (dy, dx), axis=(0, 1))))
    return out


def load_frames(media: Path, names, n: int, size: int | None = None) -> list[np.ndarray]:
    """The first n frames of each video (resized to size x size if given). Where PyAV is missing (a bare GPU
    machine), still photos with a slow synthetic motion stand in; FRAME_SOURCE records which was used."""
    from PIL import Image

    from engine.media import MediaError, MediaSource

    out = []
    for k, name in enumerate(names):
        try:
            clip = [f.rgb for _, f in zip(range(n), MediaSource(media / name).frames())]
        except MediaError as exc:
            if "PyAV" not in str(exc):
                raise
            FRAME_SOURCE.update(kind="stills (PyAV not installed)", reason=str(exc))
            clip = _still_clip(media, k, n)
        for rgb in clip:
            if size and rgb.shape[:2] != (size, size):
                rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
            out.append(np.ascontiguousarray(rgb))
    return out


def load_images(media: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(media / n).convert("RGB")) for n in IMAGES if (media / n).is_file()]


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeat` runs (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---------------------------------------------------------------- parity

def parity(cpu_pack, dev_pack, images, frames, fp16: bool) -> dict:
    import torch

    from engine.geometry import FLIP
    from engine.networks.preprocess import letterbox_detector_input, roi_from_detection
    from engine.tracker import TrackerConfig

    col = 1 if fp16 else 0
    res: dict = {"tolerances": {k: v[col] for k, v in TOL.items()}}
    # detector: raw outputs and decoded detections on photos and video frames
    d_reg = d_score = 0.0
    n_det_cpu = n_det_dev = 0
    faces = []
    for rgb in images + frames[::10]:
        x_cpu, info = letterbox_detector_input(cpu_pack.backend.tensor(rgb))
        x_dev, _ = letterbox_detector_input(dev_pack.backend.tensor(rgb))
        r_c, l_c = cpu_pack.backend.run(cpu_pack.detector.net, x_cpu)
        r_d, l_d = dev_pack.backend.run(dev_pack.detector.net, x_dev)
        d_reg = max(d_reg, float((r_d.float().cpu() - r_c).abs().max()))
        d_score = max(d_score, float((torch.sigmoid(l_d.float().cpu().clamp(-100, 100))
                                      - torch.sigmoid(l_c.clamp(-100, 100))).abs().max()))
        dets = cpu_pack.detector(rgb)
        n_det_cpu += len(dets)
        n_det_dev += len(dev_pack.detector(rgb))
        for det in dets:
            faces.append((rgb, roi_from_detection(det, rgb.shape[1], rgb.shape[0])))
    res["detector"] = {"max_regressor_diff_px": d_reg, "max_score_diff": d_score, "detections_cpu": n_det_cpu,
                       "detections_device": n_det_dev,
                       "pass": d_reg <= TOL["detector_regressors_px"][col] and d_score <= TOL["detector_score"][col]
                       and n_det_cpu == n_det_dev}
    # landmarks: same ROI, single calls on the CPU vs single and batched calls on the device
    p_single = p_batch = s_diff = 0.0
    dev_items = [(dev_pack.landmarker.to_tensor(rgb), roi) for rgb, roi in faces]
    batched = dev_pack.landmarker.batch(dev_items)
    for (rgb, roi), item, (pb, sb) in zip(faces, dev_items, batched):
        pc, sc = cpu_pack.landmarker(cpu_pack.landmarker.to_tensor(rgb), roi)
        pd, sd = dev_pack.landmarker(*item)
        p_single = max(p_single, float(np.abs(pd - pc).max()))
        p_batch = max(p_batch, float(np.abs(pb - pc).max()))
        s_diff = max(s_diff, abs(sd - sc), abs(sb - sc))
    res["landmarks"] = {"faces": len(faces), "max_point_diff_px_single": p_single, "max_point_diff_px_batched": p_batch,
                        "max_score_diff": s_diff,
                        "pass": max(p_single, p_batch) <= TOL["landmarks_px"][col] and s_diff <= TOL["landmark_score"][col]}
    # end to end: every frame a new track (ROI from the detector), coefficients and pose
    cfg = TrackerConfig(filter=False, prdl=False)
    t_cpu, t_dev = cpu_pack.tracker(cfg), dev_pack.tracker(cfg)
    e_exp = e_rot = e_tr = 0.0
    n = 0
    for i, rgb in enumerate(frames[::3]):
        t_cpu.reset_track()
        t_dev.reset_track()
        a, b = t_cpu.process(rgb, i), t_dev.process(rgb, i)
        if not (a.face and b.face):
            continue
        n += 1
        e_exp = max(e_exp, float(np.abs(a.expression - b.expression).max()))
        r = (FLIP @ a.rotation).T @ (FLIP @ b.rotation)
        e_rot = max(e_rot, math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1) / 2)))))
        e_tr = max(e_tr, float(np.abs(a.translation_cm - b.translation_cm).max()))
    res["end_to_end"] = {"frames": n, "max_expression_diff": e_exp, "max_rotation_diff_deg": e_rot,
                         "max_translation_diff_cm": e_tr,
                         "pass": n > 0 and e_exp <= TOL["e2e_expression"][col] and e_rot <= TOL["e2e_rotation_deg"][col]
                         and e_tr <= TOL["e2e_translation_cm"][col]}
    # continuing tracks (informational): each frame is cropped at the previous frame's landmarks, so any
    # rounding difference moves the crop and the two runs drift apart a little
    t_cpu, t_dev = cpu_pack.tracker(cfg), dev_pack.tracker(cfg)
    drift = 0.0
    for i, rgb in enumerate(frames[:60]):
        a, b = t_cpu.process(rgb, i), t_dev.process(rgb, i)
        if a.face and b.face:
            drift = max(drift, float(np.abs(a.expression - b.expression).max()))
    res["continuing_track_expression_drift"] = drift
    res["pass"] = all(res[k]["pass"] for k in ("detector", "landmarks", "end_to_end"))
    return res


# ---------------------------------------------------------------- stage times and throughput

def stage_times(pack, frames, device: str, repeat: int) -> dict:
    from engine.networks.preprocess import letterbox_detector_input, roi_from_detection
    from engine.tracker import TrackerConfig

    rgb = frames[0]
    det = pack.detector(rgb)[0]
    roi = roi_from_detection(det, rgb.shape[1], rgb.shape[0])
    image = pack.landmarker.to_tensor(rgb)
    points, _ = pack.landmarker(image, roi)
    def ms(fn):
        return 1e3 * timed(fn, device, repeat)

    out = {
        "upload_ms": ms(lambda: pack.landmarker.to_tensor(rgb)),
        "detector_letterbox_ms": ms(lambda: letterbox_detector_input(pack.backend.tensor(rgb))),
        "detector_ms": ms(lambda: pack.detector(rgb)),
        "landmarks_ms": ms(lambda: pack.landmarker(image, roi)),
    }
    tracker = pack.tracker(TrackerConfig(prdl=False))
    tracker.process(rgb, 0)
    prev = tracker.previous
    cam = tracker.camera_for(rgb.shape[1], rgb.shape[0])
    out["regressor_ms_new_track"] = ms(lambda: pack.regressor.regress(points, cam, tracker.identity))
    out["regressor_ms_tracking"] = ms(lambda: pack.regressor.regress(points, cam, tracker.identity, prev))
    totals = []
    for i, f in enumerate(frames[: max(repeat * 3, 30)]):
        totals.append(tracker.process(f, i + 1).timings_ms.get("total", 0.0))
    out["tracker_total_ms_median"] = statistics.median(totals[5:]) if len(totals) > 5 else statistics.median(totals)
    return {k: round(v, 3) for k, v in out.items()}


def throughput(pack, frames, device: str, batches, repeat: int, regress_ms: float) -> dict:
    import torch

    from engine.networks.preprocess import crop_rois, roi_from_detection

    items = []
    for rgb in frames:
        dets = pack.detector(rgb)
        if dets:
            items.append((pack.landmarker.to_tensor(rgb), roi_from_detection(dets[0], rgb.shape[1], rgb.shape[0])))
        if len(items) >= max(batches):
            break
    while len(items) < max(batches):
        items = items + items
    # tracked faces for the batched regressor: each item's landmarks with its own new-track fit as the previous
    # frame (the same face one frame later, as on a live track)
    from engine.geometry import Camera

    reg = pack.regressor
    points = [np.asarray(p[0], np.float64) for p in pack.landmarker.batch(items[: max(batches)])]
    cams = [Camera.from_fov(int(img.shape[-1]), int(img.shape[-2]), 60.0) for img, _ in items[: max(batches)]]
    idents = [np.zeros(reg.model.n_id) for _ in points]
    prevs = [reg.regress(p, c, i).fit for p, c, i in zip(points, cams, idents)]
    out = {}
    for b in batches:
        batch = items[:b]
        t = timed(lambda: pack.landmarker.batch(batch), device, repeat)
        net_in = torch.cat([crop_rois(img, [roi]) for img, roi in batch])
        t_net = timed(lambda: pack.backend.run(pack.landmarker.net, net_in), device, repeat)
        t_reg = timed(lambda: reg.regress_batch(points[:b], cams[:b], idents[:b], prevs[:b], device=device),
                      device, repeat)
        out[str(b)] = {"landmark_stage_ms": round(t * 1e3, 3), "landmark_net_ms": round(t_net * 1e3, 3),
                       "landmark_faces_per_s": round(b / t, 1),
                       "landmark_plus_regressor_faces_per_s_1_thread": round(b / (t + b * regress_ms / 1e3), 1),
                       "regress_batch_ms": round(t_reg * 1e3, 3),
                       "landmark_plus_regress_batch_faces_per_s": round(b / (t + t_reg), 1)}
    return out


def _regress_worker_init():
    global _REG, _CAM
    import torch

    torch.set_num_threads(1)  # one core per worker process
    from engine.face_model import FaceModel
    from engine.geometry import Camera
    from engine.regressor import Regressor

    _REG = Regressor(FaceModel.load())
    _CAM = Camera.from_fov(512, 512, 60.0)


def _regress_worker(points):
    """One tracking-frame regression (warm start from the same face's new-track fit, as on a live track)."""
    identity = np.zeros(_REG.model.n_id)
    key = points[:4, :2].tobytes()  # the same face arrives as a fresh (unpickled) array each call
    prev = _PREV.get(key)
    if prev is None:
        prev = _PREV[key] = _REG.regress(points, _CAM, identity).fit
    _REG.regress(points, _CAM, identity, prev)
    return 1


_PREV: dict = {}


def regressor_processes(points: list[np.ndarray], procs: int, seconds: float = 3.0) -> dict:
    """Faces/s of the per-face NumPy regressor in `procs` worker processes (it holds the GIL: threads do
    not scale it)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs, initializer=_regress_worker_init) as pool:
        pool.map(_regress_worker, points[:procs] * 2)  # warm every worker
        work = (points * (1 + int(procs * 400 / max(len(points), 1))))
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < seconds:
            done += sum(pool.map(_regress_worker, work[: procs * 20], chunksize=4))
        dt = time.perf_counter() - t0
    return {"processes": procs, "faces_per_s": round(done / dt, 1)}


# ---------------------------------------------------------------- main

def summary_text(r: dict) -> str:
    """The text summary; a step that failed (or was skipped) shows its error instead of its table."""
    lines: list[str] = []
    for section in (_sum_header, _sum_parity, _sum_stages, _sum_throughput, _sum_streams):
        try:
            lines += section(r)
        except Exception as exc:  # noqa: BLE001 - a broken step must not hide the other figures
            name = section.__name__.replace("_sum_", "")
            err = (r.get(name) or {}).get("error") if isinstance(r.get(name), dict) else None
            lines += [f"{name}: {err or f'no summary ({type(exc).__name__}: {exc})'}", ""]
    lines.append(f"wall time {r.get('wall_s')} s")
    return "\n".join(lines)


def _sum_header(r):
    m = r["machine"]
    lines = [f"facestream GPU bench — device {m['device']}" + (f" ({m.get('gpu')})" if m.get("gpu") else ""),
             f"backend {r['backend']}; torch {m['torch']} (CUDA {m['torch_cuda']}); cupy {m['cupy']}; {m['cpu']}",
             "backends: " + ", ".join(f"{k}: {'ok' if v is None else v}" for k, v in m["backends"].items()),
             f"frames: {r.get('frames', {}).get('kind', 'video')}"]
    if "graphs_captured" in r:
        lines.append(f"CUDA graphs captured: {r['graphs_captured']} in {r['graph_capture_s']} s"
                     + (f"; capture errors: {r['graph_capture_errors']}" if r.get("graph_capture_errors") else ""))
    if "regress_graphs" in r:
        g = r["regress_graphs"]
        lines.append(f"batched fit graphs (batch buckets): {[b for b, _ in g['captured']]}"
                     + (f"; capture errors: {g['errors']}" if g["errors"] else ""))
    if "refine_graphs" in r:
        g = r["refine_graphs"]
        lines.append(f"PRDL refinement graphs (bucket, (parts, anchors)): {len(g['captured'])} captured"
                     + (f"; capture errors: {g['errors']}" if g["errors"] else ""))
    return lines + [""]


def _sum_parity(r):
    p = r.get("parity")
    if not p:
        return []
    t = p["tolerances"]
    return ["parity vs CPU (tolerance in brackets):",
            f"  detector   regressors {p['detector']['max_regressor_diff_px']:.2e} px [{t['detector_regressors_px']}]"
            f"  score {p['detector']['max_score_diff']:.2e} [{t['detector_score']}]  detections "
            f"{p['detector']['detections_device']}/{p['detector']['detections_cpu']}  "
            f"{'PASS' if p['detector']['pass'] else 'FAIL'}",
            f"  landmarks  {p['landmarks']['faces']} faces, single {p['landmarks']['max_point_diff_px_single']:.2e} px,"
            f" batched {p['landmarks']['max_point_diff_px_batched']:.2e} px [{t['landmarks_px']}], score "
            f"{p['landmarks']['max_score_diff']:.2e} [{t['landmark_score']}]  {'PASS' if p['landmarks']['pass'] else 'FAIL'}",
            f"  end to end {p['end_to_end']['frames']} frames, expression {p['end_to_end']['max_expression_diff']:.2e}"
            f" [{t['e2e_expression']}], rotation {p['end_to_end']['max_rotation_diff_deg']:.2e} deg "
            f"[{t['e2e_rotation_deg']}], translation {p['end_to_end']['max_translation_diff_cm']:.2e} cm "
            f"[{t['e2e_translation_cm']}]  {'PASS' if p['end_to_end']['pass'] else 'FAIL'}",
            f"  (continuing track over 60 frames, informational: expression drift {p['continuing_track_expression_drift']:.3f})",
            ""]


def _sum_stages(r):
    s = r.get("stages")
    if not s:
        return []
    return ["per-stage times, one face (ms, median): " + ", ".join(f"{k} {v}" for k, v in s.items()
                                                                   if k != "error"), ""]


def _sum_throughput(r):
    lines = []
    tp = r.get("throughput")
    if tp:
        lines.append("batch  landmark stage ms  net ms  landmark faces/s  +regressor (1 thread) faces/s"
                     "  regress_batch ms  landmarks + regress_batch faces/s")
        for b, v in tp.items():
            lines.append(f"{b:>5}  {v['landmark_stage_ms']:>17}  {v['landmark_net_ms']:>6}  {v['landmark_faces_per_s']:>16}"
                         f"  {v['landmark_plus_regressor_faces_per_s_1_thread']:>29}  {v['regress_batch_ms']:>16}"
                         f"  {v['landmark_plus_regress_batch_faces_per_s']:>33}")
        lines.append("")
    rp = r.get("regressor_processes")
    if rp:
        lines.append(f"regressor in {rp['processes']} processes: {rp['faces_per_s']} faces/s")
        if tp and "32" in tp:
            lines.append(f"landmarks (batch 32) + regressor ({rp['processes']} processes) bound: "
                         f"{min(tp['32']['landmark_faces_per_s'], rp['faces_per_s'])} faces/s "
                         "(the slower of the two stages measured apart; the stream simulation runs them together)")
        lines.append("")
    return lines


def _sum_streams(r):
    sim = r.get("streams")
    if not sim:
        return []
    prdl = " with PRDL on every frame" if any(v.get("prdl") for v in sim) else ""
    lines = [f"simulated 30 fps streams{prdl} (network processes + session processes, see engine/bench_streams.py):",
             "wait ms  net  streams  procs  p50 ms  p95 ms  p99 ms  drop   fps/stream  mean batch  held (p95<=15ms, drops<=1%)"]
    for v in sim:
        wait = f"{v.get('max_wait_ms', ''):>7}  {v.get('network_processes', 1):>3}"
        if "error" in v:
            lines.append(f"{wait}  {v['streams']:>7}  error: {v['error']}")
            continue
        lines.append(f"{wait}  {v['streams']:>7}  {v['processes']:>5}  {v['latency_ms_p50']:>6}  {v['latency_ms_p95']:>6}"
                     f"  {v['latency_ms_p99']:>6}  {v['drop_rate']:>5}  {v['fps_per_stream']:>10}  "
                     f"{v['landmark_mean_batch']:>10}  {'yes' if v['held'] else 'no'}")
    lines.append("where the latency goes (p50/p95 ms): landmarks and regress calls (with their queueing), PRDL, the tracker's run, "
                 "the wait before it; latency of frames with / without a detector run")
    for v in sim:
        p = v.get("parts_ms_p50_p95")
        if p:
            prdl_part = f"  prdl {p['prdl']}" if v.get("prdl") else ""
            lines.append(f"{v.get('max_wait_ms', ''):>7}  {v.get('network_processes', 1):>3}  {v['streams']:>7}"
                         f"  landmarks {p['landmarks']}  regress {p['regress']}{prdl_part}"
                         f"  tracker {p['tracker']}  before {p['before_tracker']}  detect frames {v['detect_frames']:.1%}"
                         f" {v['latency_ms_p50_p95_detect_frames']} / tracked {v['latency_ms_p50_p95_tracked_frames']}")
    return lines + [f"streams held at p95 <= 15 ms: {r.get('streams_held', 0)}", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.bench_gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--backend", default="auto", help="device backend: auto (tensorrt > cuda), cuda or tensorrt")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--streams", default=None, help="stream counts to simulate (default cuda: 1,8,16,32,48,64; cpu: 1,2)")
    ap.add_argument("--streams-per-process", type=int, default=3,
                    help="streams per session process in the simulation (the per-face regressor holds the GIL)")
    ap.add_argument("--network-processes", default="1", help="network processes (each its own pack, scheduler and "
                    "CUDA context) sharing the simulated streams: a comma list runs the simulation once per count")
    ap.add_argument("--prdl", action="store_true", help="simulated streams refine every frame with PRDL (landmark "
                    "masks; on a GPU in the scheduler's refine stage)")
    ap.add_argument("--max-wait-ms", default="2", help="the scheduler's collection window(s), ms: a comma list runs "
                                                       "the stream simulation once per window")
    ap.add_argument("--stream-seconds", type=float, default=None)
    ap.add_argument("--regress-procs", type=int, default=None, help="processes for the regressor throughput step")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=180.0,
                    help="no new stream count is started after this many seconds (keeps bench/gpu.sh under 8 min)")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: parity,stages,throughput,regressor,streams")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()

    from engine.backends import cuda_unavailable_reason
    from engine.pack import Pack

    device = args.device or ("cuda" if cuda_unavailable_reason() is None else "cpu")
    if device == "cuda" and cuda_unavailable_reason():
        sys.exit(f"bench_gpu: error: --device cuda: {cuda_unavailable_reason()}; use --device cpu")
    cpu_mode = device == "cpu"
    backend_name = args.backend
    if backend_name == "auto" and not cpu_mode:
        from engine.backends import backend_status
        backend_name = "tensorrt" if backend_status()["tensorrt"] is None else "cuda"
    skip = set(filter(None, args.skip.split(",")))
    repeat = args.repeat or (5 if cpu_mode else 30)
    batches = [int(b) for b in args.batches.split(",")]
    waits = [float(w) for w in str(args.max_wait_ms).split(",")]
    nets = [int(k) for k in str(args.network_processes).split(",")]
    streams = [int(s) for s in (args.streams or ("1,2" if cpu_mode else "1,8,16,32,48,64")).split(",")]
    seconds = args.stream_seconds or (3.0 if cpu_mode else 4.0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    media = check_assets()
    result: dict = {"machine": machine_info(device)}
    print(f"bench_gpu: device {device}, loading packs ...", flush=True)
    cpu_pack = Pack("torch")
    dev_pack = Pack(make_backend(device, backend_name))
    result["backend"] = dev_pack.backend.describe()
    fp16 = dev_pack.backend.name == "tensorrt"
    frames = load_frames(media, VIDEOS[:3], 40 if cpu_mode else 90)
    images = load_images(media)
    result["frames"] = dict(FRAME_SOURCE)
    if hasattr(dev_pack.backend, "runner") and not cpu_mode:
        from engine.batching import BatchScheduler
        t0 = time.perf_counter()
        sched = BatchScheduler(dev_pack)
        result["graphs_captured"] = sched.warm()
        sched.close()
        if hasattr(dev_pack.backend, "capture_errors"):
            result["graph_capture_errors"] = dev_pack.backend.capture_errors()
        result["backend"] = dev_pack.backend.describe()
        result["graph_capture_s"] = round(time.perf_counter() - t0, 2)
        result["regress_graphs"] = dev_pack.regressor.batched_graphs(sched.stage_device or "cpu")
        if sched.refine is not None:
            g = sched.device_refiner().graphs
            result["refine_graphs"] = {"captured": sorted(str(k) for k in g.graphs),
                                       "errors": {str(k): v for k, v in g.errors.items()}}

    def save(final: bool = False):
        """Results so far to --out (after every step, so a run cut short by a time limit keeps them)."""
        result["wall_s"] = round(time.perf_counter() - t_all, 1)
        result["complete"] = final
        (out_dir / "bench_gpu.json").write_text(json.dumps(result, indent=1, default=str))
        text = summary_text(result)
        (out_dir / "bench_gpu.txt").write_text(text + "\n")
        return text

    def step(name, fn):
        if name in skip:
            return
        t0 = time.perf_counter()
        print(f"bench_gpu: {name} ...", flush=True)
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing step must not lose the others' figures
            import traceback
            traceback.print_exc()
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"bench_gpu: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        save()

    step("parity", lambda: parity(cpu_pack, dev_pack, images, frames, fp16))
    step("stages", lambda: stage_times(dev_pack, frames, device, repeat))
    if cpu_mode and "stages" not in skip:
        result["stages_cpu_reference"] = "device side is the CPU in --device cpu mode"
    regress_ms = (result.get("stages") or {}).get("regressor_ms_tracking") or 5.0
    step("throughput", lambda: throughput(dev_pack, frames, device, batches, max(3, repeat // 3), regress_ms))
    pts = []
    if "regressor" not in skip:
        from engine.networks.preprocess import roi_from_detection
        for rgb in frames[::9][:8]:
            d = cpu_pack.detector(rgb)
            if d:
                pts.append(cpu_pack.landmarker(cpu_pack.landmarker.to_tensor(rgb), roi_from_detection(d[0]))[0])
    procs = args.regress_procs or max(1, min(16, (os.cpu_count() or 2)))
    step("regressor", lambda: regressor_processes(pts, procs, 2.0 if cpu_mode else 4.0))
    if "regressor" in result:
        result["regressor_processes"] = result.pop("regressor")
    cpu_pack = None  # noqa: F841 - frees the CPU networks before the stream simulation

    def sim():
        from engine.bench_streams import load_clips, simulate

        clips = load_clips(media, VIDEOS[:4], 60, 512)
        rows = []
        for net, wait in ((k, w) for k in nets for w in waits):
            for n in streams:
                if time.perf_counter() - t_all > args.budget_s:
                    rows.append({"streams": n, "max_wait_ms": wait, "network_processes": net,
                                 "error": f"not run: time budget of {args.budget_s:g} s used up"})
                    break
                print(f"bench_gpu: {n} streams, collection window {wait:g} ms, {net} network process(es) ...", flush=True)
                rows.append({"max_wait_ms": wait,
                             **simulate(dev_pack, clips, n, args.streams_per_process, seconds, wait,
                                        network_processes=net, backend=(device, backend_name), prdl=args.prdl)})
                print("   ", rows[-1], flush=True)
                result["streams"] = rows
                save()
                if "error" in rows[-1] or (not rows[-1]["held"] and rows[-1].get("drop_rate", 1) > 0.1):
                    break  # far past capacity: larger counts only cost time
        return rows

    step("streams", sim)
    if isinstance(result.get("streams"), list):
        held = [r["streams"] for r in result["streams"] if r.get("held")]
        result["streams_held"] = max(held) if held else 0
    print(save(final=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
