"""The moderngl renderer on a real headless GL context (EGL; Mesa llvmpipe on a CPU machine): the mesh
lands where the tracker's own projection puts it, the styles differ, and the avatar inset is drawn."""
from __future__ import annotations

import numpy as np
import pytest

from engine.face_model import FaceModel
from engine.geometry import FLIP, Camera, euler_to_matrix, matrix_to_quat
from engine.messages import FaceState


@pytest.fixture(scope="module")
def renderer():
    from engine.render import RenderError, Renderer

    try:
        r = Renderer(FaceModel.load())
    except RenderError as exc:
        pytest.skip(f"no OpenGL context here: {exc}")
    yield r
    r.release()


def face_state(model: FaceModel, yaw=15.0) -> FaceState:
    rot = euler_to_matrix(yaw, -5.0, 3.0)
    exp = np.zeros(model.n_exp)
    return FaceState(frame=0, pts=0, ts_capture=0.0, face=True, score=1.0, expression=exp,
                     blendshapes=np.zeros(52), rotation=rot, euler_deg=(yaw, -5.0, 3.0), quat=matrix_to_quat(rot),
                     translation_cm=np.array([1.0, -0.5, 45.0]), gaze_deg={"left": (0.0, 0.0), "right": (0.0, 0.0)},
                     identity=np.zeros(model.n_id))


def test_mesh_covers_its_projection_only(renderer):
    model = renderer.model
    cam = Camera.from_fov(320, 240, 60.0)
    frame = np.full((240, 320, 3), 40, np.uint8)
    st = face_state(model)
    out = renderer.render(frame, st, cam, "shaded", avatar=False)
    assert out.shape == frame.shape and out.dtype == np.uint8
    verts = model.vertices(st.identity, st.expression) @ (FLIP @ st.rotation).T + st.translation_cm
    uv = cam.project(verts[model.part_labels == model.part_names.index("nose")])
    u, v = np.round(uv.mean(0)).astype(int)
    assert out[v, u].mean() > 80, "the nose must be drawn where the projection puts it"
    assert np.abs(out[:5, :5].astype(int) - 34).max() <= 1  # background: the frame dimmed to 85 %
    changed = np.abs(out.astype(int) - (frame * 0.85).astype(int)).sum(2) > 6
    lo = uv.min(0)
    assert changed.mean() > 0.03 and changed[:, : int(lo[0]) - 60].mean() < 0.01  # nothing far left of the face


def test_styles_differ_and_avatar_inset(renderer):
    cam = Camera.from_fov(320, 240, 60.0)
    frame = np.full((240, 320, 3), 40, np.uint8)
    st = face_state(renderer.model)
    shaded = renderer.render(frame, st, cam, "shaded", avatar=False)
    parts = renderer.render(frame, st, cam, "parts", avatar=False)
    wire = renderer.render(frame, st, cam, "wireframe", avatar=False)
    assert np.abs(shaded.astype(int) - parts).mean() > 1.0 and np.abs(shaded.astype(int) - wire).mean() > 1.0
    with_avatar = renderer.render(frame, st, cam, "shaded", avatar=True)
    inset = np.abs(with_avatar.astype(int) - shaded)[-72:, -72:].sum(2) > 10  # bottom-right corner
    assert inset.mean() > 0.5
    with pytest.raises(ValueError, match="unknown overlay style"):
        renderer.render(frame, st, cam, "glitter")


def test_no_face_returns_the_frame(renderer):
    frame = np.random.default_rng(0).integers(0, 255, (121, 163, 3), np.uint8)  # odd size
    out = renderer.render(frame, FaceState(frame=0, pts=None, ts_capture=0.0), Camera.from_fov(163, 121), "parts")
    assert np.array_equal(out, frame)
