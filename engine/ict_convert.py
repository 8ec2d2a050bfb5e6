"""Convert an ICT-FaceKit ``FaceXModel`` folder into the packed ``ict_face_model.npz``.

Layout and conventions: ``shared/assets/ict_facekit/README.md``. Input (ICT-FaceKit at
da5f95a6): ``generic_neutral_mesh.obj``, ``identityKKK.obj``, one OBJ per name in the
``expressions`` list of ``vertex_indices.json``, the optional extra shapes ``PupilDilate_L/R``
and ``cheekRaiser_L/R``, and ``vertex_indices.json``. Fewer identities/expressions than the
full 100/53 are accepted: every ``identity*.obj`` present and every listed expression is used.

Produced: neutral, id_basis, id_names, exp_basis, exp_names, extra_exp_basis, extra_exp_names,
faces, uv, uv_faces, face_to_polygon, polygons, polygon_uv, polygon_material, material_names,
region_* and subregion_* (names, vertex/polygon ranges from the README tables; face ranges
derived), landmarks_multipie68, fitting_vertices, rigid_vertices, lap_rigid_vertices (when the
json has ``idx_to_lap_rigid_verts``), rigid_landmark_idx, fitting_exp_names, units, source.

Not produced (neither derivable from the OBJ/JSON files nor tabulated in the README):
``tooth_names``/``tooth_vertex_ranges``/``tooth_polygon_ranges``/``tooth_face_ranges`` and
``jawline_right``/``jawline_left``/``jawline_right_extended``/``jawline_left_extended``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

__all__ = ["convert_facexmodel"]

SOURCE = "github ICT-VGL/ICT-FaceKit:FaceXModel@da5f95a607f5e6b37755b38d3385d7f2853732e5"
EXTRA_SHAPES = ("PupilDilate_L", "PupilDilate_R", "cheekRaiser_L", "cheekRaiser_R")

# (name, vertex start, vertex end, polygon start, polygon end), half-open, from the README.
REGIONS = (
    ("face", 0, 9409, 0, 9230),
    ("head_neck", 9409, 11248, 9230, 11144),
    ("mouth_socket", 11248, 13294, 11144, 13226),
    ("eye_socket_left", 13294, 13678, 13226, 13630),
    ("eye_socket_right", 13678, 14062, 13630, 14034),
    ("gums_tongue", 14062, 17039, 14034, 17006),
    ("teeth", 17039, 21451, 17006, 21496),
    ("eyeball_left", 21451, 23021, 21496, 23094),
    ("eyeball_right", 23021, 24591, 23094, 24692),
    ("lacrimal_fluid_left", 24591, 24795, 24692, 24855),
    ("lacrimal_fluid_right", 24795, 24999, 24855, 25018),
    ("eye_blend_left", 24999, 25023, 25018, 25033),
    ("eye_blend_right", 25023, 25047, 25033, 25048),
    ("eye_occlusion_left", 25047, 25199, 25048, 25176),
    ("eye_occlusion_right", 25199, 25351, 25176, 25304),
    ("eyelashes_left", 25351, 26035, 25304, 25844),
    ("eyelashes_right", 26035, 26719, 25844, 26384),
)
SUBREGIONS = (
    ("face_narrow", 0, 6706, 0, 6560),
    ("sclera_left", 21451, 22221, 21496, 22296),
    ("iris_left", 22221, 23021, 22296, 23094),
    ("sclera_right", 23021, 23791, 23094, 23894),
    ("iris_right", 23791, 24591, 23894, 24692),
)


def _read_obj(path: Path, topology: bool = False) -> dict[str, np.ndarray]:
    """Stream one OBJ: vertices (float64) always; UVs, polygons and ``usemtl`` when ``topology``."""
    v, vt, corners, mats, mat_names, cur = [], [], [], [], [], -1
    with open(path) as f:
        for line in f:
            if line.startswith("v "):
                v.append(line)
            elif not topology:
                continue
            elif line.startswith("vt "):
                vt.append(line)
            elif line.startswith("f "):
                corners.append([c.split("/") for c in line.split()[1:]])
                mats.append(cur)
            elif line.startswith("usemtl "):
                name = line.split(None, 1)[1].strip()
                if name not in mat_names:
                    mat_names.append(name)
                cur = mat_names.index(name)
    out = {"v": np.loadtxt(v, usecols=(1, 2, 3), ndmin=2)}
    if not topology:
        return out
    # 1-based "v/vt[/vn]" corners -> 0-based (polygon, corner) tables padded with -1.
    k = max(len(p) for p in corners)
    polygons = np.array([[int(c[0]) - 1 for c in p] + [-1] * (k - len(p)) for p in corners], np.int32)
    polygon_uv = np.array(
        [[int(c[1]) - 1 if len(c) > 1 and c[1] else -1 for c in p] + [-1] * (k - len(p)) for p in corners],
        np.int32,
    )
    # Fan triangulation in polygon order: (a, b, c, d) -> (a, b, c), (a, c, d).
    ntri = (polygons >= 0).sum(1) - 2
    face_to_polygon = np.repeat(np.arange(len(polygons), dtype=np.int32), ntri)
    j = np.arange(len(face_to_polygon)) - np.repeat(np.cumsum(ntri) - ntri, ntri) + 1
    cols = np.stack([np.zeros_like(j), j, j + 1], 1)
    rows = face_to_polygon[:, None]
    return out | {
        "uv": np.loadtxt(vt, usecols=(1, 2), ndmin=2).astype(np.float32),
        "polygons": polygons,
        "polygon_uv": polygon_uv,
        "polygon_material": np.array(mats, np.int16),
        "material_names": np.array(mat_names, dtype=str),
        "faces": polygons[rows, cols],
        "uv_faces": polygon_uv[rows, cols],
        "face_to_polygon": face_to_polygon,
    }


def _ranges(prefix: str, table, face_to_polygon: np.ndarray) -> dict[str, np.ndarray]:
    vr = np.array([r[1:3] for r in table], np.int32)
    pr = np.array([r[3:5] for r in table], np.int32)
    return {
        f"{prefix}_names": np.array([r[0] for r in table]),
        f"{prefix}_vertex_ranges": vr,
        f"{prefix}_polygon_ranges": pr,
        f"{prefix}_face_ranges": np.searchsorted(face_to_polygon, pr).astype(np.int32),
    }


def _deltas(src: Path, names, neutral: np.ndarray) -> np.ndarray:
    out = np.empty((len(names), *neutral.shape), np.float32)
    for i, name in enumerate(names):
        v = _read_obj(src / f"{name}.obj")["v"]
        if v.shape != neutral.shape:
            raise ValueError(f"{name}.obj has {len(v)} vertices, the neutral mesh {len(neutral)}")
        out[i] = v - neutral
    return out


def convert_facexmodel(src: Path, out: Path, *, source: str = SOURCE) -> None:
    """Convert the FaceXModel folder ``src`` into the npz ``out`` (see the module docstring)."""
    src, out = Path(src), Path(out)
    meta = json.loads((src / "vertex_indices.json").read_text())
    mesh = _read_obj(src / "generic_neutral_mesh.obj", topology=True)
    neutral = mesh.pop("v")
    if (len(neutral), len(mesh["polygons"])) != (REGIONS[-1][2], REGIONS[-1][4]):
        raise ValueError("the neutral mesh does not match the ICT README region tables")

    id_names = sorted(p.stem for p in src.glob("identity*.obj") if re.fullmatch(r"identity\d{3}", p.stem))
    exp_names = list(meta["expressions"])
    extra_names = [n for n in EXTRA_SHAPES if (src / f"{n}.obj").is_file()]
    arrays = {
        "neutral": neutral.astype(np.float32),
        "id_basis": _deltas(src, id_names, neutral),
        "id_names": np.array(id_names, dtype=str),
        "exp_basis": _deltas(src, exp_names, neutral),
        "exp_names": np.array(exp_names, dtype=str),
        "extra_exp_basis": _deltas(src, extra_names, neutral),
        "extra_exp_names": np.array(extra_names, dtype=str),
        **mesh,
        **_ranges("region", REGIONS, mesh["face_to_polygon"]),
        **_ranges("subregion", SUBREGIONS, mesh["face_to_polygon"]),
    }
    for key, name in (
        ("idx_to_landmark_verts", "landmarks_multipie68"),
        ("idx_to_fitting_verts", "fitting_vertices"),
        ("idx_to_rigid_verts", "rigid_vertices"),
        ("idx_to_lap_rigid_verts", "lap_rigid_vertices"),
        ("idx_to_rigid_landmark_idx", "rigid_landmark_idx"),
    ):
        if key in meta:
            arrays[name] = np.asarray(meta[key], np.int32)
    if "fitting_expressions" in meta:
        arrays["fitting_exp_names"] = np.array(meta["fitting_expressions"])
    arrays["units"] = np.array("cm")
    arrays["source"] = np.array(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # a file object: savez would append ".npz" to other names
        np.savez_compressed(f, **arrays)
