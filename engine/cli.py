"""`facestream` command line: track, bench, assets."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from engine import assets
from engine.media import MediaError

EXIT_USAGE = 2
EXIT_INPUT = 3


def _error(msg: str, code: int = EXIT_INPUT) -> int:
    print(f"facestream: error: {msg}", file=sys.stderr)
    return code


# ---------------------------------------------------------------- track

# track / bench refine with PRDL unless --no-prdl: with landmark masks the tracker stays above 30 fps at
# 640x480 on the 2-core CPU (docs/BENCHMARKS.md)
PRDL_DEFAULT = True


def _tracker_config(args):
    from engine.tracker import TrackerConfig

    prdl = PRDL_DEFAULT if args.prdl is None else args.prdl
    return TrackerConfig(hfov_deg=args.fov, detect_every=args.detect_every, filter=not args.no_filter, prdl=prdl)


def _add_tracking_args(p: argparse.ArgumentParser) -> None:
    from engine.geometry import DEFAULT_HFOV_DEG

    p.add_argument("--fov", type=float, default=DEFAULT_HFOV_DEG,
                   help=f"camera horizontal field of view in degrees (default {DEFAULT_HFOV_DEG:g})")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda", "tensorrt"],
                   help="network backend: auto (default: tensorrt > cuda > torch, whichever runs here; "
                        "$FACESTREAM_BACKEND overrides auto), torch (CPU), cuda, tensorrt")
    p.add_argument("--landmark-model", default="attention", choices=["attention", "mesh468"],
                   help="attention: 478-point attention mesh (default); mesh468: 468 mesh + iris network")
    p.add_argument("--detect-every", type=int, default=30,
                   help="re-run the face detector every N frames while tracking (0: only when the face is lost)")
    p.add_argument("--no-filter", action="store_true", help="turn off the temporal (One-Euro) filter")
    on = "on" if PRDL_DEFAULT else "off"
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prdl", dest="prdl", action="store_const", const=True, default=None,
                   help=f"refine each frame with PRDL against part masks (default: {on})")
    g.add_argument("--no-prdl", dest="prdl", action="store_const", const=False,
                   help="turn PRDL refinement off (regressor answer only)")
    p.add_argument("--prdl-masks", default="landmarks", choices=["landmarks", "parser"],
                   help="part masks for --prdl: rasterised landmark contours, or the BiSeNetV2 face parser")


def cmd_track(args) -> int:
    from tqdm import tqdm

    from engine.media import MediaSource, VideoWriter
    from engine.messages import build_message
    from engine.overlay import MeshOverlay
    from engine.pack import Pack

    source = MediaSource(args.input)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pack = Pack(args.backend, args.landmark_model)
    tracker = pack.tracker(_tracker_config(args), masks=args.prdl_masks, profile=_load_profile(args.profile))
    overlay = None if args.no_overlay else MeshOverlay(pack.model)
    writer = None
    session = Path(args.input).stem
    faces = n = 0
    jsonl = out / "coefficients.jsonl"
    bar = tqdm(total=source.count, unit="frame", disable=not sys.stderr.isatty() or args.quiet,
               desc=Path(args.input).name)
    with open(jsonl, "w") as f:
        for frame in source.frames():
            if source.kind != "video":
                tracker.reset_track()  # separate photos share no motion
            state = tracker.process(frame.rgb, frame.index, pts=frame.pts,
                                    t_seconds=frame.pts if frame.pts is not None else None)
            state.timings_ms["decode"] = frame.decode_ms
            msg = build_message(state, session, include_landmarks68=args.landmarks)
            f.write(json.dumps(msg, separators=(",", ":")) + "\n")
            faces += state.face
            n += 1
            if overlay is not None:
                camera = tracker.camera_for(frame.rgb.shape[1], frame.rgb.shape[0])
                image = overlay.draw(frame.rgb, state, camera)
                if source.kind == "video":
                    if writer is None:
                        writer = VideoWriter(out / "overlay.mp4", source.fps or 25, image.shape[1], image.shape[0])
                    writer.write(image)
                else:
                    from PIL import Image

                    (out / "overlay").mkdir(exist_ok=True)
                    Image.fromarray(image).save(out / "overlay" / (Path(frame.name).stem + ".png"))
            bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
    print(f"{n} frames, face found in {faces}; wrote {jsonl}"
          + ("" if overlay is None else f" and {out / ('overlay.mp4' if source.kind == 'video' else 'overlay/')}"))
    return 0


# ---------------------------------------------------------------- bench

def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def cmd_bench(args) -> int:
    from PIL import Image

    from engine.media import MediaSource
    from engine.pack import Pack

    source = MediaSource(args.input)
    frames = []
    for frame in source.frames():
        rgb = frame.rgb
        if args.size:
            w, h = (int(v) for v in args.size.lower().split("x"))
            rgb = np.array(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        frames.append((rgb, frame.pts, frame.decode_ms))
        if args.frames and len(frames) >= args.frames:
            break
    pack = Pack(args.backend, args.landmark_model)
    tracker = pack.tracker(_tracker_config(args), masks=args.prdl_masks)
    stages: dict[str, list[float]] = {}
    faces = 0
    warmup = min(args.warmup, max(len(frames) - 1, 0))
    t_wall = None
    for i, (rgb, pts, decode_ms) in enumerate(frames):
        if i == warmup:
            t_wall = time.perf_counter()
        state = tracker.process(rgb, i, pts=pts, t_seconds=pts)
        if i < warmup:
            continue
        faces += state.face
        timings = dict(state.timings_ms)
        timings["decode"] = decode_ms
        timings["total"] = timings.get("total", 0.0) + decode_ms
        for k, v in timings.items():
            stages.setdefault(k, []).append(v)
    measured = len(frames) - warmup
    wall = time.perf_counter() - t_wall if t_wall else 0.0
    decode_total = sum(stages.get("decode", [])) / 1e3
    fps = measured / (wall + decode_total) if measured else 0.0
    h, w = frames[0][0].shape[:2]
    result = {
        "input": str(args.input), "resolution": f"{w}x{h}", "frames": measured, "faces": faces,
        "fps": round(fps, 2), "backend": pack.backend.describe(), "landmarks": pack.landmark_model,
        "machine": machine_description(),
        "stages": {k: {"median_ms": round(float(np.median(v)), 3), "p95_ms": round(float(np.percentile(v, 95)), 3),
                       "max_ms": round(float(np.max(v)), 3), "frames": len(v)}
                   for k, v in sorted(stages.items())},
    }
    print(f"{result['input']} {result['resolution']}  {measured} frames  face in {faces}  backend {result['backend']}")
    print(f"{'stage':<13} {'median ms':>10} {'p95 ms':>10} {'max ms':>10} {'frames':>7}")
    for k, v in result["stages"].items():
        print(f"{k:<13} {v['median_ms']:>10.2f} {v['p95_ms']:>10.2f} {v['max_ms']:>10.2f} {v['frames']:>7d}")
    print(f"fps (decode + tracking, one face): {fps:.1f}   machine: {result['machine']}")
    if args.json:
        print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- calibrate

def _load_profile(path):
    """The profile for tracking; a corrupt or foreign file is reported and tracking goes on uncalibrated."""
    if not path:
        return None
    from calibration.profile import Profile, ProfileError

    try:
        return Profile.load(path)
    except ProfileError as exc:
        print(f"facestream: warning: {exc}; tracking without calibration", file=sys.stderr)
        return None


def cmd_calibrate(args) -> int:
    from calibration import capture
    from calibration.profile import Profile, ProfileError

    try:
        profile = Profile.load_or_new(args.profile)
    except ProfileError as exc:
        return _error(f"{exc} (fix or remove the file; calibration writes a new one)")
    if args.what == "camera":
        from calibration.camera import calibrate_checkerboard, from_fov
        from engine.media import MediaSource

        source = MediaSource(args.input)
        if args.fov:
            first = next(source.frames()).rgb
            cal = from_fov(args.camera_name, first.shape[1], first.shape[0], args.fov)
        else:
            cols, rows = (int(v) for v in args.pattern.lower().split("x"))
            cal = calibrate_checkerboard((f.rgb for f in source.frames()), (cols, rows), args.square_cm,
                                         name=args.camera_name)
        profile.camera = cal.to_dict()
        print(f"camera {cal.name}: fx {cal.fx:.1f} fy {cal.fy:.1f} cx {cal.cx:.1f} cy {cal.cy:.1f} px"
              + (f", reprojection error {cal.rms_px:.3f} px over {cal.frames_used} frames" if cal.rms_px is not None else ""))
    else:
        from engine.pack import Pack

        pack = Pack(args.backend)
        end = args.end if args.end is not None else None
        if args.what == "identity":
            tracked = capture.track_video(pack, args.input, args.start, end, fit_identity_frames=10**9)
            profile.identity = capture.identity_from(pack, tracked)
            print(f"identity from {profile.identity.frames} frames; per-frame spread "
                  f"{profile.identity.spread:.3f} cm (mean landmark distance)")
        elif args.what == "neutral":
            tracked = capture.track_video(pack, args.input, args.start, end)
            window = None if args.end is None and args.start == 0 else (0, len(tracked.blendshapes))
            profile.neutral = capture.neutral_from(tracked, window)
            top = sorted(profile.neutral.blendshapes.items(), key=lambda kv: -kv[1])[:4]
            print(f"resting face from {profile.neutral.frames} frames; largest resting values: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in top))
            if args.relative_head_pose:
                profile.relative_head_pose = True
        else:  # ranges
            tracked = capture.track_video(pack, args.input, args.start, end)
            profile.ranges = capture.ranges_from(tracked, profile.neutral)
            print(f"ranges for {len(profile.ranges.maximum)} blendshapes from {profile.ranges.frames} frames: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in list(profile.ranges.maximum.items())[:6]))
    profile.save(args.profile)
    print(f"wrote {args.profile}")
    return 0


# ---------------------------------------------------------------- eval-prdl

def cmd_eval_prdl(args) -> int:
    from engine.eval_prdl import evaluate, format_report
    from engine.refine import RefineConfig

    cfg = RefineConfig(anchors=args.anchors, points=args.points, iterations=args.iterations,
                       candidates=args.candidates)
    result = evaluate(args.faces, cfg, seed=args.seed)
    result["machine"] = machine_description()
    print(format_report(result))
    if args.json:
        print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- assets

def cmd_assets(args) -> int:
    if args.action == "check":
        missing_required = 0
        for spec, path in assets.check():
            mark = "ok     " if path else ("MISSING" if spec.required else "absent ")
            missing_required += path is None and spec.required
            print(f"{mark} {spec.relpath:<62} {spec.what}" + (f"  [{path}]" if path else ""))
        print("search roots: " + ", ".join(str(r) for r in assets.search_roots()))
        if missing_required:
            print(f"{missing_required} required asset(s) missing: {assets.FETCH_HINT}")
            return 1
        return 0
    dest = Path(args.dest) if args.dest else assets.cache_dir()
    parts = args.only or ["mediapipe", "geometry", "ict"]
    for part in parts:
        print(f"fetching {part} into {dest} ...", flush=True)
        if part == "mediapipe":
            written = assets.fetch_mediapipe_models(dest, wheel=Path(args.wheel) if args.wheel else None)
        elif part == "geometry":
            written = assets.fetch_mediapipe_geometry(dest)
        else:
            written = [assets.fetch_ict(dest)]
        for p in written:
            print(f"  wrote {p}")
    return 0


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="facestream", description="Real-time 3D face tracking (ICT-FaceKit, ARKit 52).")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("track", help="track every frame of a video, an image or a folder of images")
    p.add_argument("input")
    p.add_argument("--out", required=True, help="output folder (coefficients.jsonl, overlay.mp4 or overlay/*.png)")
    p.add_argument("--landmarks", action="store_true", help="add the 68 fitted landmarks (pixels) to each message")
    p.add_argument("--no-overlay", action="store_true", help="write coefficients only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--profile", help="calibration profile (JSON) made by `facestream calibrate`")
    _add_tracking_args(p)
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("calibrate", help="calibrate camera, identity, resting face or ranges into a profile")
    p.add_argument("what", choices=["neutral", "ranges", "identity", "camera"])
    p.add_argument("input", help="video (or images) of the user; for camera: a checkerboard video")
    p.add_argument("--profile", required=True, help="profile JSON to create or update")
    p.add_argument("--start", type=int, default=0, help="first frame to use")
    p.add_argument("--end", type=int, default=None,
                   help="frame after the last to use (neutral: without --start/--end the stillest second is used)")
    p.add_argument("--relative-head-pose", action="store_true", help="neutral: report head pose relative to it")
    p.add_argument("--pattern", default="9x6", help="camera: inner corners of the checkerboard, COLSxROWS")
    p.add_argument("--square-cm", type=float, default=2.5, help="camera: checkerboard square size")
    p.add_argument("--fov", type=float, default=None, help="camera: use this horizontal field of view instead")
    p.add_argument("--camera-name", default="camera", help="camera: name stored in the profile")
    p.add_argument("--backend", default="auto")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bench", help="per-stage timing of the tracker on a video")
    p.add_argument("input")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--frames", type=int, default=0, help="use at most N frames (0: all)")
    p.add_argument("--warmup", type=int, default=5, help="frames run before timing starts")
    p.add_argument("--size", help="resize frames to WxH before tracking (e.g. 640x480); resizing is not timed")
    _add_tracking_args(p)
    p.set_defaults(func=cmd_bench)

    from engine.refine import RefineConfig

    defaults = RefineConfig()
    p = sub.add_parser("eval-prdl", help="PRDL refinement on synthetic faces with known coefficients")
    p.add_argument("--faces", type=int, default=60, help="number of synthetic faces (cycling through the cases)")
    p.add_argument("--anchors", type=int, default=defaults.anchors, help="anchor grid is N x N")
    p.add_argument("--points", type=int, default=defaults.points, help="points per part")
    p.add_argument("--iterations", type=int, default=defaults.iterations)
    p.add_argument("--candidates", type=int, default=defaults.candidates,
                   help="candidate surface samples per point and part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_eval_prdl)

    p = sub.add_parser("assets", help="check or fetch the model files")
    p.add_argument("action", choices=["check", "fetch"])
    p.add_argument("--dest", help="fetch into this folder (default: the user cache)")
    p.add_argument("--only", action="append", choices=["mediapipe", "geometry", "ict"],
                   help="fetch only this part (repeatable)")
    p.add_argument("--wheel", help="use this local mediapipe wheel instead of downloading it")
    p.set_defaults(func=cmd_assets)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MediaError as exc:
        return _error(str(exc))
    except assets.AssetMissingError as exc:
        return _error(str(exc))
    except (ValueError, FileNotFoundError) as exc:  # CalibrationError and ProfileError included
        return _error(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        return _error("interrupted", 130)


if __name__ == "__main__":
    raise SystemExit(main())
