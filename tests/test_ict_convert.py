"""engine.ict_convert: rebuild a small FaceXModel folder from the shared npz and convert it back."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assets_root

N_ID = 3
EXP_IDX = (0, 10, 26)  # browDown_L, eyeBlink_L, jawOpen
OMITTED = ("tooth_names", "tooth_vertex_ranges", "tooth_polygon_ranges", "tooth_face_ranges",
           "jawline_right", "jawline_left", "jawline_right_extended", "jawline_left_extended")


@pytest.fixture(scope="module")
def ref():
    path = assets_root() / "ict_facekit" / "ict_face_model.npz"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    with np.load(path) as m:
        return {k: m[k] for k in m.files}


def _obj_topology(m) -> str:
    """``vt``, ``usemtl`` and ``f v/vt`` lines (1-based) of the reference mesh."""
    lines = [f"vt {u:.9g} {v:.9g}" for u, v in m["uv"]]
    cur = -1
    for poly, puv, mat in zip(m["polygons"], m["polygon_uv"], m["polygon_material"]):
        if mat != cur:
            cur = mat
            lines.append(f"usemtl {m['material_names'][mat]}")
        lines.append("f " + " ".join(f"{a + 1}/{t + 1}" for a, t in zip(poly, puv) if a >= 0))
    return "\n".join(lines) + "\n"


def _write_obj(path, verts: np.ndarray, topology: str) -> None:
    vlines = "\n".join(f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in verts.tolist())
    path.write_text("mtllib generic_neutral_mesh.mtl\n" + vlines + "\n" + topology)


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
    from engine.ict_convert import convert_facexmodel

    src = tmp_path_factory.mktemp("FaceXModel")
    topo = _obj_topology(ref)
    neutral = ref["neutral"]
    _write_obj(src / "generic_neutral_mesh.obj", neutral, topo)
    for k in range(N_ID):
        _write_obj(src / f"identity{k:03d}.obj", neutral + ref["id_basis"][k], topo)
    exp_names = [str(ref["exp_names"][j]) for j in EXP_IDX]
    for j, name in zip(EXP_IDX, exp_names):
        _write_obj(src / f"{name}.obj", neutral + ref["exp_basis"][j], topo)
    for j, name in enumerate(ref["extra_exp_names"]):
        _write_obj(src / f"{name}.obj", neutral + ref["extra_exp_basis"][j], topo)
    meta = {
        "expressions": exp_names,
        "fitting_expressions": exp_names,
        "incompatibilities": [],
        "idx_to_fitting_verts": ref["fitting_vertices"].tolist(),
        "idx_to_rigid_verts": ref["rigid_vertices"].tolist(),
        "idx_to_lap_rigid_verts": ref["lap_rigid_vertices"].tolist(),
        "idx_to_landmark_verts": ref["landmarks_multipie68"].tolist(),
        "idx_to_rigid_landmark_idx": ref["rigid_landmark_idx"].tolist(),
    }
    (src / "vertex_indices.json").write_text(json.dumps(meta))
    out = src.parent / "out" / "model.npz"
    convert_facexmodel(src, out)
    with np.load(out) as m:
        return {k: m[k] for k in m.files}


def test_keys_and_dtypes(ref, converted):
    assert set(converted) == set(ref) - set(OMITTED)
    for k, a in converted.items():
        assert a.dtype.kind == ref[k].dtype.kind, k
        if a.dtype.kind != "U":
            assert a.dtype == ref[k].dtype, k


def test_shapes_match_reference(ref, converted):
    exp_idx = list(EXP_IDX)
    assert converted["id_basis"].shape == (N_ID, *ref["neutral"].shape)
    np.testing.assert_array_equal(converted["id_names"], ref["id_names"][:N_ID])
    np.testing.assert_array_equal(converted["exp_names"], ref["exp_names"][exp_idx])
    np.testing.assert_array_equal(converted["fitting_exp_names"], ref["exp_names"][exp_idx])
    np.testing.assert_array_equal(converted["extra_exp_names"], ref["extra_exp_names"])
    np.testing.assert_allclose(converted["neutral"], ref["neutral"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(converted["id_basis"], ref["id_basis"][:N_ID], rtol=0, atol=1e-5)
    np.testing.assert_allclose(converted["exp_basis"], ref["exp_basis"][exp_idx], rtol=0, atol=1e-5)
    np.testing.assert_allclose(converted["extra_exp_basis"], ref["extra_exp_basis"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(converted["uv"], ref["uv"], rtol=0, atol=1e-6)


def test_topology_and_tables_exact(ref, converted):
    skip = {"neutral", "id_basis", "id_names", "exp_basis", "exp_names", "fitting_exp_names",
            "extra_exp_basis", "extra_exp_names", "uv"}
    for k in sorted(set(converted) - skip):
        np.testing.assert_array_equal(converted[k], ref[k], err_msg=k)
        assert converted[k].shape == ref[k].shape, k
