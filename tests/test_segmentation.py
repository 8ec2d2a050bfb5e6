"""Segmentation engines: landmark-rasterised part masks on real faces, the BiSeNetV2 port against
LiteRT, and the parser's part masks against the landmark ones.

Figures behind the thresholds (8 real faces from the shared media, 2-core CPU):
* BiSeNetV2 torch vs LiteRT class maps at 448x448: 99.09-99.65 % equal pixels (99.48 % overall);
  with l_/r_ classes merged (what the engine uses), face-class IoU >= 0.91 on every face.
* parser vs landmark part masks (IoU, 128 px): eyes >= 0.47 (0 behind glasses, labelled eye_g),
  brows >= 0.35, lips >= 0.22 (open O mouth), nose >= 0.62, skin >= 0.68; on the two faces used
  here: >= 0.44 for every part.
"""
from __future__ import annotations

import numpy as np
import pytest

from engine.media import MediaSource
from engine.segmentation import (PART_NAMES, LandmarkSegmenter, PartMasks, close_eyelids, face_crop,
                                 fill_polygons)

from conftest import media_path

FRONTAL = ("tps_source.png", "d3d_000031.jpg")
P = PART_NAMES.index


@pytest.fixture(scope="module")
def faces(pack):
    """name -> (rgb, landmarks (478, 3) px) from the real tracker."""
    out = {}
    for name in FRONTAL:
        rgb = next(iter(MediaSource(media_path(name)).frames())).rgb
        state = pack.tracker().process(rgb, 0)
        assert state.landmarks is not None, f"no face found on {name}"
        out[name] = (rgb, np.asarray(state.landmarks, np.float64))
    return out


@pytest.fixture(scope="module")
def landmark_segmenter():
    return LandmarkSegmenter()


def centroid_x(pm: PartMasks, part: str) -> float:
    return float(pm.points(part)[:, 0].mean())


# ---------------------------------------------------------------- landmark engine

def test_scanline_fill_matches_point_in_polygon_test():
    from engine.face_topology import points_in_polygon

    rng = np.random.default_rng(0)
    size = 64
    polys = [rng.uniform(-8, size + 8, (n, 2)) for n in (3, 7, 16, 40)]  # self-intersecting too
    polys.append(np.array([[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0]]))  # on pixel centres
    got = fill_polygons(polys, size)
    ys, xs = np.mgrid[0:size, 0:size]
    centres = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    for k, poly in enumerate(polys):
        ref = points_in_polygon(centres, poly).reshape(size, size)
        assert (got[k] == ref).all(), f"polygon {k}: fill differs from the point test"
    assert got[-1].sum() == 20 * 20  # half-open rule: rows/cols 10..29


@pytest.mark.parametrize("name", FRONTAL)
def test_landmark_masks_on_frontal_face(faces, landmark_segmenter, name):
    rgb, lm = faces[name]
    pm = landmark_segmenter(lm, rgb.shape[:2], size=128)
    assert pm.masks.shape == (8, 128, 128) and pm.masks.dtype == np.bool_ and pm.source == "landmarks"
    areas = dict(zip(PART_NAMES, pm.masks.sum((1, 2)).tolist()))
    assert all(a > 20 for a in areas.values()), f"empty part: {areas}"
    assert max(areas, key=areas.get) == "skin"
    assert pm.masks.sum(0).max() == 1, "parts overlap"
    # subject's own sides: in an unmirrored photo the left parts are on the image's right
    for kind in ("eye", "brow"):
        assert centroid_x(pm, f"left_{kind}") > centroid_x(pm, f"right_{kind}") + 0.1 * pm.crop.w
    # vertical order in the face: brows above eyes above nose above upper lip above lower lip
    ys = {p: pm.points(p, image=False)[:, 1].mean() for p in PART_NAMES}
    assert max(ys["left_brow"], ys["right_brow"]) < min(ys["left_eye"], ys["right_eye"]) < ys["nose"]
    assert ys["nose"] < ys["upper_lip"] < ys["lower_lip"]
    # the masks sit on the landmarks: iris centres inside the eye masks
    for side, iris in (("left", 473), ("right", 468)):
        c, r = np.round(pm.to_crop(lm[None, iris, :2])[0]).astype(int)
        assert pm.part(f"{side}_eye")[r, c]
    # forehead cut: no skin above the brows' top edge
    brow_top = min(pm.points("left_brow", image=False)[:, 1].min(), pm.points("right_brow", image=False)[:, 1].min())
    assert pm.points("skin", image=False)[:, 1].min() >= brow_top - 1


def test_crop_transform_round_trip(faces, landmark_segmenter):
    rgb, lm = faces[FRONTAL[0]]
    pm = landmark_segmenter(lm, rgb.shape[:2], size=96)
    xy = lm[:, :2]
    assert np.allclose(pm.to_image(pm.to_crop(xy)), xy, atol=1e-9)
    inside = pm.to_crop(xy)
    assert (inside > 0).all() and (inside < 95).all(), "landmarks must lie inside the x1.25 crop"
    # pixel centres map to the image point the crop says (rotation and scale)
    c = pm.to_image(np.array([[47.5, 47.5]]))[0]
    assert np.allclose(c, [pm.crop.cx, pm.crop.cy])
    assert pm.crop == face_crop(lm)


def test_eye_masks_shrink_when_eyelids_close(faces, landmark_segmenter):
    rgb, lm = faces[FRONTAL[0]]
    crop = face_crop(lm)  # same crop, so areas compare directly
    open_ = landmark_segmenter(lm, rgb.shape[:2], crop=crop)
    half = landmark_segmenter(close_eyelids(lm, 0.5), rgb.shape[:2], crop=crop)
    shut = landmark_segmenter(close_eyelids(lm, 1.0), rgb.shape[:2], crop=crop)
    for side in ("left", "right"):
        a0, a1, a2 = (m.part(f"{side}_eye").sum() for m in (open_, half, shut))
        assert a2 < 0.1 * a0 and a1 < 0.75 * a0, f"{side} eye areas open/half/shut {a0}/{a1}/{a2}"
        # the closed eye's pixels go to the skin, nowhere else
        assert shut.part("skin").sum() >= open_.part("skin").sum() + 0.8 * (a0 - a2) / 2
    for p in ("upper_lip", "lower_lip", "nose", "left_brow", "right_brow"):
        assert (shut.part(p) == open_.part(p)).all()


# ---------------------------------------------------------------- BiSeNetV2 face parser

@pytest.fixture(scope="module")
def parser():
    from engine.assets import AssetMissingError
    from engine.segmentation import ParserSegmenter

    try:
        return ParserSegmenter()
    except AssetMissingError as exc:
        pytest.skip(f"{exc}")


def test_bisenet_port_matches_litert(faces, parser):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        pytest.skip("ai-edge-litert not installed (pip install -e .[test])")
    import torch

    it = Interpreter(model_path=str(parser.net_path), num_threads=2)
    it.allocate_tensors()
    merge = np.arange(19)
    merge[[3, 5]] = [2, 4]  # r_brow -> l_brow, r_eye -> l_eye: the engine takes eyes/brows side-less
    for name in FRONTAL:
        rgb, lm = faces[name]
        x = parser.parser_input(rgb, parser.parser_crop(lm))
        with torch.inference_mode():
            ours = parser.net(x)[0].argmax(0).numpy()
        it.set_tensor(it.get_input_details()[0]["index"], x.permute(0, 2, 3, 1).contiguous().numpy())
        it.invoke()
        ref = it.get_tensor(it.get_output_details()[0]["index"])
        assert ref.shape == ours.shape == (448, 448)
        agree = (ours == ref).mean()
        assert agree > 0.985, f"{name}: {agree:.2%} of pixels agree with LiteRT (measured >= 99.09%)"
        a, b = merge[ours], merge[ref]
        for c in (1, 2, 4, 10, 12, 13):  # skin, brow, eye, nose, upper lip, lower lip
            union = ((a == c) | (b == c)).sum()
            if union >= 200:
                iou = ((a == c) & (b == c)).sum() / union
                assert iou > 0.85, f"{name}: class {c} IoU {iou:.3f} vs LiteRT (measured >= 0.91)"


def test_parser_masks_overlap_landmark_masks(faces, parser, landmark_segmenter):
    rgb, lm = faces[FRONTAL[0]]
    pm = parser(rgb, lm, size=128)
    ref = landmark_segmenter(lm, rgb.shape[:2], size=128)
    assert pm.masks.shape == (8, 128, 128) and pm.source.startswith("bisenetv2:")
    assert pm.crop == ref.crop
    assert pm.masks.sum(0).max() == 1
    floors = {"left_eye": 0.5, "right_eye": 0.5, "left_brow": 0.3, "right_brow": 0.3, "upper_lip": 0.4,
              "lower_lip": 0.4, "nose": 0.5, "skin": 0.7}  # measured here: 0.72 0.80 0.44 0.44 0.62 0.57 0.71 0.86
    for p, floor in floors.items():
        a, b = pm.part(p), ref.part(p)
        iou = (a & b).sum() / max((a | b).sum(), 1)
        assert iou > floor, f"{p}: parser/landmark IoU {iou:.2f} <= {floor}"
