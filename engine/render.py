"""Headless OpenGL rendering of the tracked face with moderngl: the fitted mesh over the video frame
(shaded, wireframe or PRDL part colours) and an avatar inset (the neutral identity driven by the live
expression, head rotation and gaze).

One `Renderer` owns one GL context (EGL: Mesa llvmpipe on a CPU machine, the driver's EGL on NVIDIA) and
must be used from the thread that created it. The tracker never imports this module; the server
composes the two. GLSL lives in `shaders/` at the repository root.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from engine.face_model import FaceModel
from engine.geometry import FLIP, Camera
from engine.messages import FaceState
from engine.overlay import PART_COLOURS, UNLABELLED

SHADER_DIR = Path(__file__).resolve().parent.parent / "shaders"
STYLES = ("shaded", "wireframe", "parts")
SKIN = np.array((0.80, 0.74, 0.70), np.float32)
WIRE = np.array((0.35, 1.0, 0.55), np.float32)
AVATAR_BACKGROUND = (0.12, 0.13, 0.16)
AVATAR_DISTANCE_CM = 60.0
AVATAR_HFOV_DEG = 22.0
DEPTH_RANGE = (1.0, 1000.0)  # cm


class RenderError(RuntimeError):
    """No usable OpenGL context (no EGL driver, or the shaders are missing)."""


def _shader(name: str) -> str:
    path = SHADER_DIR / name
    if not path.is_file():
        raise RenderError(f"shader {path} is missing (the shaders/ folder ships with the repository)")
    return path.read_text()


def _unique_edges(faces: np.ndarray) -> np.ndarray:
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 0)
    e.sort(axis=1)
    return np.unique(e, axis=0).astype(np.int32)


def create_context():
    """A headless GL 3.3 context: EGL first (no display needed), then the platform default."""
    import moderngl

    errors = []
    for kwargs in ({"backend": "egl"}, {}):
        try:
            return moderngl.create_context(standalone=True, require=330, **kwargs)
        except Exception as exc:  # moderngl raises plain Exception when a backend is unavailable
            errors.append(f"{kwargs.get('backend', 'default')}: {exc}")
    raise RenderError("no OpenGL 3.3 context could be created (" + "; ".join(errors) +
                      "). On Debian/Ubuntu install libegl1 and libgl1-mesa-dri (Mesa llvmpipe renders on the CPU).")


class Renderer:
    """Renders FaceStates over RGB frames. Not thread-safe: use it from the thread that made it."""

    def __init__(self, model: FaceModel, avatar_fraction: float = 0.3, avatar_every: int = 2):
        import moderngl

        self.model = model
        self.avatar_fraction = avatar_fraction
        self.ctx = create_context()
        self.gl_renderer = self.ctx.info.get("GL_RENDERER", "unknown")
        ctx = self.ctx
        self.mesh_prog = ctx.program(vertex_shader=_shader("mesh.vert"), fragment_shader=_shader("mesh.frag"))
        self.bg_prog = ctx.program(vertex_shader=_shader("background.vert"),
                                   fragment_shader=_shader("background.frag"))
        quad = np.array([-1, -1, 1, -1, -1, 1, 1, 1], np.float32)
        self.bg_vao = ctx.vertex_array(self.bg_prog, [(ctx.buffer(quad.tobytes()), "2f", "in_xy")])

        n = len(model.part_labels)
        labels = model.part_labels
        part_rgb = np.where(labels[:, None] >= 0, PART_COLOURS[np.clip(labels, 0, None)], UNLABELLED) / 255.0
        colours = {"shaded": np.tile(SKIN, (n, 1)), "parts": part_rgb, "wireframe": np.tile(WIRE, (n, 1))}
        self.pos_buf = ctx.buffer(reserve=n * 12, dynamic=True)
        tri = ctx.buffer(np.ascontiguousarray(model.faces, np.int32).tobytes())
        edges = ctx.buffer(_unique_edges(model.faces).tobytes())
        self.vao = {}
        for name, rgb in colours.items():
            cbuf = ctx.buffer(np.ascontiguousarray(rgb, np.float32).tobytes())
            content = [(self.pos_buf, "3f", "in_pos"), (cbuf, "3f", "in_colour")]
            self.vao[name] = ctx.vertex_array(self.mesh_prog, content, index_buffer=tri, index_element_size=4)
            if name == "wireframe":
                self.edge_vao = ctx.vertex_array(self.mesh_prog, content, index_buffer=edges,
                                                 index_element_size=4)
        self._targets: dict[tuple[int, int], tuple] = {}
        self._moderngl = moderngl
        self._neutral_identity = np.zeros(model.n_id)
        self.avatar_every = avatar_every
        self._avatar = None
        self._avatar_tick = avatar_every
        self._avatar_size_drawn = 0

    # ------------------------------------------------------------------ public
    def render(self, rgb: np.ndarray, state: FaceState, camera: Camera, style: str = "shaded",
               avatar: bool = True) -> np.ndarray:
        """The frame with the tracked mesh drawn over it (and the avatar inset): (H, W, 3) uint8."""
        if style not in STYLES:
            raise ValueError(f"unknown overlay style '{style}'; choose one of {', '.join(STYLES)}")
        h, w = rgb.shape[:2]
        fbo, texture = self._target(w, h)
        texture.write(np.ascontiguousarray(rgb, np.uint8).tobytes())
        ctx = self.ctx
        fbo.use()
        ctx.viewport = (0, 0, w, h)
        fbo.clear(depth=1.0)  # the background pass below writes no depth (depth test off)
        ctx.disable(self._moderngl.DEPTH_TEST | self._moderngl.BLEND)
        texture.use(0)
        self.bg_prog["frame"].value = 0
        self.bg_prog["dim"].value = 0.85 if state.face else 1.0
        self.bg_vao.render(self._moderngl.TRIANGLE_STRIP)
        if state.face:
            verts = self._posed_vertices(state, state.identity, FLIP @ state.rotation, state.translation_cm)
            self._draw_mesh(verts, camera, style, opacity=0.55)
            if avatar:
                self._draw_avatar(state, w, h)
        return np.frombuffer(fbo.read(components=3, alignment=1), np.uint8).reshape(h, w, 3)

    def release(self) -> None:
        self.ctx.release()

    # ------------------------------------------------------------------ drawing
    def _target(self, w: int, h: int):
        if (w, h) not in self._targets:
            if len(self._targets) > 4:  # sessions changing size: keep the cache small
                for fbo, tex in self._targets.values():
                    fbo.release()
                    tex.release()
                self._targets.clear()
            tex = self.ctx.texture((w, h), 3)
            tex.filter = (self._moderngl.LINEAR, self._moderngl.LINEAR)
            fbo = self.ctx.framebuffer(color_attachments=[self.ctx.renderbuffer((w, h), 3)],
                                       depth_attachment=self.ctx.depth_renderbuffer((w, h)))
            self._targets[(w, h)] = (fbo, tex)
        return self._targets[(w, h)]

    def _posed_vertices(self, state: FaceState, identity, rot_cam: np.ndarray, translation) -> np.ndarray:
        verts = self.model.vertices(identity, state.expression)
        if state.gaze_deg is not None:
            yaw = np.radians([state.gaze_deg["left"][0], state.gaze_deg["right"][0]])
            pitch = np.radians([state.gaze_deg["left"][1], state.gaze_deg["right"][1]])
            verts = self.model.eyeball_rotate(verts, yaw, pitch, identity)
        return (verts @ rot_cam.T + np.asarray(translation)).astype(np.float32)

    def _set_camera(self, fx, fy, cx, cy, w, h) -> None:
        self.mesh_prog["intrinsics"].value = (fx, fy, cx, cy)
        self.mesh_prog["image_size"].value = (w, h)
        self.mesh_prog["depth_range"].value = DEPTH_RANGE

    def _draw_mesh(self, verts: np.ndarray, camera: Camera, style: str, opacity: float) -> None:
        mgl, ctx = self._moderngl, self.ctx
        self.pos_buf.write(verts.tobytes())
        self._set_camera(camera.fx, camera.fy, camera.cx, camera.cy, camera.width, camera.height)
        ctx.enable(mgl.DEPTH_TEST | mgl.BLEND)
        ctx.blend_func = mgl.SRC_ALPHA, mgl.ONE_MINUS_SRC_ALPHA
        self.mesh_prog["opacity"].value = opacity
        if style == "wireframe":
            # depth-only pass, pushed back a little, so that only the front-facing edges are drawn
            self.mesh_prog["flat_colour"].value = 0
            ctx.polygon_offset = (1.0, 1.0)
            ctx.color_mask = (False, False, False, False)
            self.vao["wireframe"].render(mgl.TRIANGLES)
            ctx.color_mask = (True, True, True, True)
            ctx.polygon_offset = (0.0, 0.0)
            self.mesh_prog["flat_colour"].value = 1
            self.mesh_prog["opacity"].value = 0.45
            self.edge_vao.render(mgl.LINES)
        else:
            self.mesh_prog["flat_colour"].value = 0
            self.vao[style].render(mgl.TRIANGLES)
        ctx.disable(mgl.DEPTH_TEST | mgl.BLEND)

    def _draw_avatar(self, state: FaceState, w: int, h: int) -> None:
        """The neutral identity with the user's expression, head rotation and gaze, in a corner inset.
        The avatar is re-drawn every `avatar_every` frames into its own texture and composited every frame:
        on a CPU rasteriser its 25k triangles cost as much as the overlay itself."""
        mgl, ctx = self._moderngl, self.ctx
        s = max(int(self.avatar_fraction * min(w, h)), 32)
        fbo, tex = self._avatar_target(s)
        self._avatar_tick += 1
        if self._avatar_tick >= self.avatar_every or self._avatar_size_drawn != s:
            self._avatar_tick = 0
            self._avatar_size_drawn = s
            fbo.use()
            ctx.viewport = (0, 0, s, s)
            fbo.clear(*AVATAR_BACKGROUND, depth=1.0)
            rot_cam = FLIP @ state.rotation
            verts = self._posed_vertices(state, self._neutral_identity, rot_cam, np.zeros(3))
            centre = 0.5 * (verts.min(0) + verts.max(0))  # frame the face, not the model origin behind it
            verts = verts - centre + np.array([0.0, 0.0, AVATAR_DISTANCE_CM], np.float32)
            f = 0.5 * s / math.tan(math.radians(AVATAR_HFOV_DEG) / 2.0)
            self._draw_mesh(verts, Camera(f, f, s / 2.0, s / 2.0, s, s), "shaded", opacity=1.0)
        target, _ = self._target(w, h)
        target.use()
        margin = max(s // 20, 2)
        ctx.viewport = (w - s - margin, h - s - margin, s, s)  # bottom-right of the image (rows run top-first)
        ctx.disable(mgl.DEPTH_TEST | mgl.BLEND)
        tex.use(0)
        self.bg_prog["dim"].value = 1.0
        self.bg_vao.render(mgl.TRIANGLE_STRIP)
        ctx.viewport = (0, 0, w, h)

    def _avatar_target(self, s: int):
        if self._avatar is None or self._avatar[1].size != (s, s):
            if self._avatar is not None:
                for obj in self._avatar:
                    obj.release()
            tex = self.ctx.texture((s, s), 3)
            fbo = self.ctx.framebuffer(color_attachments=[tex], depth_attachment=self.ctx.depth_renderbuffer((s, s)))
            self._avatar = (fbo, tex)
        return self._avatar
