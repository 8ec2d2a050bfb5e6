"""ICT-FaceKit as a vectorised linear face model.

``FaceModel.load()`` gives the *tracking mesh* (ICT's ``face`` region + both eyeballs):

    V(id, exp) = neutral + id @ id_basis + exp @ exp_basis        (cm; +x = subject's left, +y up, +z forward)

computed as one matmul of the 153 coefficients with a precomputed (153, V*3) float32 basis. The
478 MediaPipe landmarks and the 68 Multi-PIE points are linear in the same coefficients
(``landmarks``, ``landmarks68``). Per-vertex PRDL part labels come from ``engine.face_topology``
(derived once from the assets and cached). The full 26,719-vertex head is kept for rendering
(``full_vertices``, ``full_faces``).

Everything is NumPy and stateless; the model knows no session state.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.assets import find_asset
from engine.face_topology import ICT_ASSET, PART_NAMES, load_topology

__all__ = ["FaceModel", "PART_NAMES"]

# MediaPipe iris landmarks (centre first, then the 4 ring points); subject's own left/right.
IRIS_LANDMARKS = {"left": (473, 474, 475, 476, 477), "right": (468, 469, 470, 471, 472)}


def _coeffs(c, n: int, name: str) -> np.ndarray:
    c = np.asarray(c, np.float32)
    if c.shape[-1:] != (n,):
        raise ValueError(f"{name} coefficients must have last dimension {n}, got shape {c.shape}")
    return c


OFFSETS_PATH = Path(__file__).resolve().parent / "weights" / "landmark_offsets.npz"


class FaceModel:
    """The ICT-FaceKit linear model on the tracking mesh (face region + eyeballs).

    Attributes (V = tracking-mesh vertex count, arrays are read-only NumPy):
      n_id, n_exp          100, 53
      exp_names            the 53 ICT expression names, file order
      neutral              (V, 3) float32, cm
      id_basis, exp_basis  (100, V, 3), (53, V, 3) float32 deltas
      faces                (F, 3) int32 triangles of the tracking mesh
      vertex_index         (V,) int32 indices of the tracking vertices in the full 26,719 mesh
      n_face_vertices      number of leading tracking vertices that are ICT's face region
      eyeball_slices       {"left": slice, "right": slice} of the eyeball vertices in the tracking mesh
      part_labels          (V,) int8, -1 or an index into PART_NAMES
      lm_tri, lm_bary      (478, 3) tracking-mesh vertex ids and barycentric weights of each landmark
      lm_neutral           (478, 3); lm_id (100, 478, 3); lm_exp (53, 478, 3)
      lm68_index           (68,) tracking-mesh vertex ids of the Multi-PIE 68 points
      eye_centres          (2, 3) neutral eyeball centres, [left, right] (subject's own)
      eye_axes             (2, 3) unit optical axes at rest (ICT's eyes look slightly outward)
      full_faces           (52220, 3) int32 triangles of the full head
    """

    n_id = 100
    n_exp = 53

    _cache: dict[str, "FaceModel"] = {}

    # ------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | Path | None = None) -> "FaceModel":
        """Load (once per process and path) the model and its derived topology."""
        path = Path(path) if path else find_asset(ICT_ASSET)
        key = str(path.resolve())
        if key not in cls._cache:
            cls._cache[key] = cls(path)
        return cls._cache[key]

    def __init__(self, path: Path):
        topo = load_topology(path)
        with np.load(path) as m:
            self.exp_names: tuple[str, ...] = tuple(str(x) for x in m["exp_names"])
            self.id_names: tuple[str, ...] = tuple(str(x) for x in m["id_names"])
            assert len(self.exp_names) == self.n_exp and len(self.id_names) == self.n_id
            self._full_neutral = m["neutral"].astype(np.float32)
            self._full_id = m["id_basis"]
            self._full_exp = m["exp_basis"]
            self.full_faces = m["faces"].astype(np.int32)
            self.region_names = tuple(str(x) for x in m["region_names"])
            self.region_vertex_ranges = m["region_vertex_ranges"].copy()
            self.region_face_ranges = m["region_face_ranges"].copy()
        vidx = topo["vertex_index"].astype(np.int64)
        self.vertex_index = topo["vertex_index"]
        self.faces = topo["faces"]
        self.n_vertices = len(vidx)
        self.n_face_vertices = int(topo["n_face"])
        self.neutral = self._full_neutral[vidx]
        self.id_basis = self._full_id[:, vidx]
        self.exp_basis = self._full_exp[:, vidx]
        # (153, V*3): coefficients [id | exp] times basis rows -> flattened vertex offsets
        self._basis = np.ascontiguousarray(
            np.concatenate([self.id_basis, self.exp_basis], 0).reshape(self.n_id + self.n_exp, -1))
        self._mean = np.ascontiguousarray(self.neutral.reshape(-1))
        self._full_basis = None
        nf3 = self.n_face_vertices * 3
        assert not np.any(self._basis[self.n_id:, nf3:]), "expressions move eyeball vertices"
        self._exp_face_basis = np.ascontiguousarray(self._basis[self.n_id:, :nf3])

        ranges = dict(zip(self.region_names, self.region_vertex_ranges))
        remap = np.full(len(self._full_neutral), -1, np.int64)
        remap[vidx] = np.arange(len(vidx))
        self.eyeball_slices = {}
        for side in ("left", "right"):
            a, b = ranges[f"eyeball_{side}"]
            ia, ib = remap[a], remap[b - 1] + 1
            self.eyeball_slices[side] = slice(int(ia), int(ib))

        self.part_names = PART_NAMES
        self.part_labels = topo["part_labels"].astype(np.int8)
        self.lm_tri = topo["lm_tri"].astype(np.int64)
        self.lm_bary = topo["lm_bary"].astype(np.float32)
        self.lm_neutral, self.lm_id, self.lm_exp = (self._at_landmarks(a) for a in
                                                    (self.neutral, self.id_basis, self.exp_basis))
        # lm_surface: the landmarks' points on the mesh itself; lm_neutral adds the learned offsets of
        # where MediaPipe puts them on real faces (tools/fit_landmark_offsets.py), when that file exists
        self.lm_surface = self.lm_neutral.copy()
        if OFFSETS_PATH.is_file():
            with np.load(OFFSETS_PATH) as off:
                self.set_landmark_offsets(off["offsets"])
        self._lm_basis = np.ascontiguousarray(np.concatenate([self.lm_id, self.lm_exp], 0).reshape(153, -1))
        self.lm68_index = topo["lm68_index"].astype(np.int64)
        self.lm68_neutral = self.neutral[self.lm68_index]
        self._lm68_basis = np.ascontiguousarray(
            self._basis.reshape(153, -1, 3)[:, self.lm68_index].reshape(153, -1))

        self.eye_centres = topo["eye_centre"].astype(np.float32)
        self._eye_centre_id = topo["eye_centre_id"].astype(np.float32)  # (100, 2, 3)
        self.eye_axes = topo["eye_axis"].astype(np.float32)
        self.eye_radius = topo["eye_radius"].astype(np.float32)
        self.iris_radius = topo["iris_radius"].astype(np.float32)
        self.contours = {k[len("contour_"):]: topo[k] for k in topo if k.startswith("contour_")}
        self.alignment = {k: topo[k] for k in topo if k.startswith(("align_", "stat_"))}
        for a in (self.neutral, self.id_basis, self.exp_basis, self._basis, self._mean, self.part_labels,
                  self.lm_neutral, self.lm_id, self.lm_exp, self._lm_basis, self.faces, self.vertex_index):
            a.setflags(write=False)

    def set_landmark_offsets(self, offsets: np.ndarray) -> None:
        """Constant model-frame offsets (478, 3) cm from the mesh points to where the landmark network
        puts each landmark; 0 gives the purely geometric correspondence."""
        lm = (self.lm_surface + np.asarray(offsets, np.float32)).astype(np.float32)
        lm.setflags(write=False)
        self.lm_neutral = lm

    def _at_landmarks(self, arr: np.ndarray) -> np.ndarray:
        """Barycentric interpolation of per-vertex arrays (..., V, 3) at the 478 landmarks."""
        return np.einsum("pk,...pkd->...pd", self.lm_bary, arr[..., self.lm_tri, :]).astype(np.float32)

    # ------------------------------------------------------------ evaluation
    def _coef(self, id_coeffs, exp_coeffs) -> np.ndarray:
        if id_coeffs is None:
            id_coeffs = np.zeros(self.n_id, np.float32)
        if exp_coeffs is None:
            exp_coeffs = np.zeros(self.n_exp, np.float32)
        i = _coeffs(id_coeffs, self.n_id, "identity")
        e = _coeffs(exp_coeffs, self.n_exp, "expression")
        lead = np.broadcast_shapes(i.shape[:-1], e.shape[:-1])
        i = np.broadcast_to(i, lead + (self.n_id,))
        e = np.broadcast_to(e, lead + (self.n_exp,))
        return np.concatenate([i, e], -1)

    def vertices(self, id_coeffs=None, exp_coeffs=None) -> np.ndarray:
        """Tracking-mesh vertices (..., V, 3) float32 in cm; leading dims of the inputs broadcast."""
        c = self._coef(id_coeffs, exp_coeffs)
        out = c @ self._basis
        out += self._mean
        return out.reshape(c.shape[:-1] + (self.n_vertices, 3))

    def landmarks(self, id_coeffs=None, exp_coeffs=None) -> np.ndarray:
        """The 478 MediaPipe landmarks as the landmark network places them on this model (..., 478, 3), cm:
        the surface points plus the learned offsets. Eyeballs at rest (no gaze)."""
        c = self._coef(id_coeffs, exp_coeffs)
        out = c @ self._lm_basis
        out += self.lm_neutral.reshape(-1)
        return out.reshape(c.shape[:-1] + (478, 3))

    def surface_landmarks(self, id_coeffs=None, exp_coeffs=None) -> np.ndarray:
        """The landmarks' points on the mesh surface itself (no learned offsets), (..., 478, 3) cm."""
        c = self._coef(id_coeffs, exp_coeffs)
        out = c @ self._lm_basis
        out += self.lm_surface.reshape(-1)
        return out.reshape(c.shape[:-1] + (478, 3))

    def landmarks68(self, id_coeffs=None, exp_coeffs=None) -> np.ndarray:
        """The 68 Multi-PIE points (ICT's own vertex landmarks), (..., 68, 3) cm."""
        c = self._coef(id_coeffs, exp_coeffs)
        out = c @ self._lm68_basis
        out += self.lm68_neutral.reshape(-1)
        return out.reshape(c.shape[:-1] + (68, 3))

    def landmarks_from_vertices(self, verts: np.ndarray) -> np.ndarray:
        """The 478 landmarks of an already computed tracking mesh (..., V, 3), e.g. after gaze rotation."""
        return self._at_landmarks(np.asarray(verts))

    def with_identity(self, id_coeffs=None) -> "IdentityFace":
        """A view with the identity frozen (as after calibration): per-frame evaluation then needs only
        the 53 expression rows over the face-region vertices (eyeballs do not move with expressions)."""
        return IdentityFace(self, id_coeffs)

    # ------------------------------------------------------------ full head (rendering)
    @property
    def full_neutral(self) -> np.ndarray:
        return self._full_neutral

    def full_vertices(self, id_coeffs=None, exp_coeffs=None) -> np.ndarray:
        """All 26,719 ICT vertices (..., 26719, 3) cm (same coefficients as ``vertices``)."""
        if self._full_basis is None:
            self._full_basis = np.ascontiguousarray(
                np.concatenate([self._full_id, self._full_exp], 0).reshape(self.n_id + self.n_exp, -1))
        c = self._coef(id_coeffs, exp_coeffs)
        out = c @ self._full_basis
        out += self._full_neutral.reshape(-1)
        return out.reshape(c.shape[:-1] + (len(self._full_neutral), 3))

    def region(self, name: str) -> slice:
        """Vertex range of an ICT region in the *full* mesh."""
        a, b = self.region_vertex_ranges[self.region_names.index(name)]
        return slice(int(a), int(b))

    # ------------------------------------------------------------ parts
    def part_vertices(self, part: str | int) -> np.ndarray:
        """Tracking-mesh vertex indices carrying a part label."""
        k = self.part_names.index(part) if isinstance(part, str) else int(part)
        return np.nonzero(self.part_labels == k)[0]

    # ------------------------------------------------------------ eyes
    def eye_centres_for(self, id_coeffs=None) -> np.ndarray:
        """Eyeball centres (..., 2, 3) [left, right] for identity coefficients (linear fit per mode)."""
        if id_coeffs is None:
            return self.eye_centres.copy()
        i = _coeffs(id_coeffs, self.n_id, "identity")
        return self.eye_centres + np.tensordot(i, self._eye_centre_id, 1)

    @staticmethod
    def _gaze_rotation(yaw, pitch) -> np.ndarray:
        """Rotation matrices (..., 3, 3): yaw about +y (positive turns the gaze toward +x, the subject's
        left), then pitch about the turned x axis (positive looks up, toward +y). Radians."""
        yaw = np.asarray(yaw, np.float32)
        pitch = np.asarray(pitch, np.float32)
        cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
        one, zero = np.ones_like(cy * cp), np.zeros_like(cy * cp)
        Ry = np.stack([np.stack([cy + zero, zero, sy + zero], -1),
                       np.stack([zero, one, zero], -1),
                       np.stack([-sy + zero, zero, cy + zero], -1)], -2)
        Rx = np.stack([np.stack([one, zero, zero], -1),  # rotation by -pitch about +x: forward tilts up
                       np.stack([zero, cp + zero, sp + zero], -1),
                       np.stack([zero, -sp + zero, cp + zero], -1)], -2)
        return Ry @ Rx

    def eyeball_rotate(self, verts: np.ndarray, yaw, pitch, id_coeffs=None, landmarks=None):
        """Rotate the eyeball vertices of tracking-mesh ``verts`` (..., V, 3) for gaze.

        ``yaw``/``pitch`` in radians, scalars (both eyes) or shape (..., 2) as [left, right]. A
        positive yaw turns the gaze toward the subject's left (+x), a positive pitch looks up.
        The rotation is about each eyeball centre (for ``id_coeffs``; neutral when None), relative
        to the rest direction. Returns a new array; with ``landmarks`` (..., 478, 3) also returns
        the landmarks with the iris points rotated the same way.
        """
        verts = np.array(verts, np.float32, copy=True)
        yaw = np.asarray(yaw, np.float32)
        pitch = np.asarray(pitch, np.float32)
        if yaw.ndim == 0 or yaw.shape[-1:] != (2,):
            yaw = np.stack([yaw, yaw], -1)
        if pitch.ndim == 0 or pitch.shape[-1:] != (2,):
            pitch = np.stack([pitch, pitch], -1)
        rot = self._gaze_rotation(yaw, pitch)  # (..., 2, 3, 3)
        centres = self.eye_centres_for(id_coeffs)  # (..., 2, 3)
        lm = None if landmarks is None else np.array(landmarks, np.float32, copy=True)
        for k, side in enumerate(("left", "right")):
            Rk = rot[..., k, :, :]
            ck = centres[..., k, :][..., None, :]
            sl = self.eyeball_slices[side]
            verts[..., sl, :] = (verts[..., sl, :] - ck) @ np.swapaxes(Rk, -1, -2) + ck
            if lm is not None:
                ids = list(IRIS_LANDMARKS[side])
                lm[..., ids, :] = (lm[..., ids, :] - ck) @ np.swapaxes(Rk, -1, -2) + ck
        return verts if lm is None else (verts, lm)


class IdentityFace:
    """``FaceModel`` with fixed identity coefficients (see ``FaceModel.with_identity``).

    ``vertices(exp)``, ``landmarks(exp)``, ``landmarks68(exp)`` equal the model's functions with this
    identity, at about a third of the memory traffic per call. Holds no other state.
    """

    def __init__(self, model: FaceModel, id_coeffs=None):
        self.model = model
        ident = np.zeros(model.n_id, np.float32) if id_coeffs is None else _coeffs(id_coeffs, model.n_id, "identity")
        if ident.ndim != 1:
            raise ValueError("with_identity takes one identity vector (100,)")
        self.id_coeffs = ident.copy()
        self.base = (model._mean + ident @ model._basis[: model.n_id]).reshape(-1, 3)
        self._base_flat = self.base.reshape(-1)
        self._nf3 = model.n_face_vertices * 3
        self.lm_base = model.lm_neutral + np.tensordot(ident, model.lm_id, 1)
        self.lm68_base = model.lm68_neutral + (ident @ model._lm68_basis[: model.n_id]).reshape(68, 3)
        self.eye_centres = model.eye_centres_for(ident)
        for a in (self.base, self.lm_base, self.lm68_base):
            a.setflags(write=False)

    def vertices(self, exp_coeffs=None) -> np.ndarray:
        m = self.model
        if exp_coeffs is None:
            return self.base.copy()
        e = _coeffs(exp_coeffs, m.n_exp, "expression")
        lead = e.shape[:-1]
        out = np.empty(lead + (m.n_vertices * 3,), np.float32)
        out[..., :] = self._base_flat
        out[..., : self._nf3] += e @ m._exp_face_basis
        return out.reshape(lead + (m.n_vertices, 3))

    def landmarks(self, exp_coeffs=None) -> np.ndarray:
        m = self.model
        e = np.zeros(m.n_exp, np.float32) if exp_coeffs is None else _coeffs(exp_coeffs, m.n_exp, "expression")
        return self.lm_base + np.tensordot(e, m.lm_exp, 1)

    def landmarks68(self, exp_coeffs=None) -> np.ndarray:
        m = self.model
        e = np.zeros(m.n_exp, np.float32) if exp_coeffs is None else _coeffs(exp_coeffs, m.n_exp, "expression")
        lead = e.shape[:-1]
        return self.lm68_base + (e @ m._lm68_basis[m.n_id:]).reshape(lead + (68, 3))

    def eyeball_rotate(self, verts, yaw, pitch, landmarks=None):
        return self.model.eyeball_rotate(verts, yaw, pitch, id_coeffs=self.id_coeffs, landmarks=landmarks)
