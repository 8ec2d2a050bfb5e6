"""PRDL refinement on synthetic faces: it recovers what a weak regressor got wrong."""
from __future__ import annotations

import numpy as np
import pytest

from engine.refine import RefineConfig, grid_thin


def test_grid_thin_keeps_one_point_per_cell_nearest_the_centre():
    pts = np.array([[0.1, 0.1], [0.5, 0.5], [0.9, 0.2], [1.5, 0.5], [1.2, 1.9]])
    kept = set(grid_thin(pts, 1.0).tolist())
    assert kept == {1, 3, 4}


@pytest.fixture(scope="module")
def refiner(model):
    from engine.gaze import ICT_EYE_LOOK
    from engine.refine import PrdlRefiner

    fixed = np.zeros(model.n_exp, bool)
    fixed[list(ICT_EYE_LOOK.values())] = True
    return PrdlRefiner(model, RefineConfig(), fixed_exp=fixed)


@pytest.mark.parametrize("case", ["one_eye_closed", "asymmetric_smile", "jaw_open", "frown", "pucker"])
def test_refinement_moves_perturbed_shapes_toward_the_truth(model, refiner, case):
    """Over several random faces of a case, the deliberately perturbed shapes get clearly closer."""
    from engine.eval_prdl import LabelCrop, render_part_labels
    from engine.synthetic import sample_face

    rng = np.random.default_rng(11)
    before, after = [], []
    for _ in range(8):
        face = sample_face(model, case, rng)
        gt = render_part_labels(model, face, face.rotation_cam, face.translation, face.expression)
        targets = refiner.targets(LabelCrop.around_face(gt))
        res = refiner.refine(targets, face.camera, face.rotation_cam_start, face.translation_start,
                             face.perturbed, face.identity, exp_prior=face.perturbed)
        assert res.loss_after <= res.loss_before
        assert np.all((res.expression >= 0) & (res.expression <= 1))
        pm = face.perturbed_mask
        before.append(np.abs(face.perturbed - face.expression)[pm].mean())
        after.append(np.abs(res.expression - face.expression)[pm].mean())
    assert np.mean(after) < 0.85 * np.mean(before), f"{case}: perturbed-shape error {np.mean(before):.3f} -> {np.mean(after):.3f}"


def test_refinement_leaves_a_correct_answer_nearly_alone(model, refiner):
    from engine.eval_prdl import LabelCrop, render_part_labels
    from engine.synthetic import sample_face

    face = sample_face(model, "jaw_open", np.random.default_rng(5))
    gt = render_part_labels(model, face, face.rotation_cam, face.translation, face.expression)
    targets = refiner.targets(LabelCrop.around_face(gt))
    res = refiner.refine(targets, face.camera, face.rotation_cam, face.translation, face.expression,
                         face.identity, exp_prior=face.expression)
    assert np.abs(res.expression - face.expression).mean() < 0.05


def test_empty_target_parts_are_left_out(model, refiner):
    from engine.eval_prdl import LabelCrop, render_part_labels
    from engine.synthetic import sample_face

    face = sample_face(model, "pucker", np.random.default_rng(7))
    gt = render_part_labels(model, face, face.rotation_cam, face.translation, face.expression)
    gt[gt == 0] = 7  # the left eye's pixels vanish from the target (as if hidden)
    targets = refiner.targets(LabelCrop.around_face(gt))
    assert not targets.valid[0] and targets.valid[1:].all()
    res = refiner.refine(targets, face.camera, face.rotation_cam, face.translation, face.expression,
                         face.identity, exp_prior=face.expression)
    assert res.used_parts[0] is False
