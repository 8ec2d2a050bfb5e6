"""Batched PRDL refinement: one implementation on an array module; a batch gives each face's own answer."""
from __future__ import annotations

import numpy as np
import pytest

from engine import prdl


def test_batch_equals_faces_one_at_a_time(refiner, batch_problems):
    """Equal up to float32 rounding: the padded point count of a batch is its largest part's, so sums over
    padded rows may round differently than in a batch of one."""
    batch = refiner.refine_batch(batch_problems)
    for p, b in zip(batch_problems, batch):
        s = refiner.refine_batch([p])[0]
        assert np.allclose(s.expression, b.expression, atol=1e-4)
        assert np.allclose(s.rotation_cam, b.rotation_cam, atol=1e-5)
        assert np.allclose(s.translation, b.translation, atol=1e-4)
        assert s.loss_after == pytest.approx(b.loss_after, rel=1e-4)
        assert b.loss_after <= b.loss_before
    # a face repeated within a batch gets the same answer twice
    twice = refiner.refine_batch([batch_problems[0], batch_problems[0]])
    assert np.array_equal(twice[0].expression, twice[1].expression)


def test_refine_is_a_batch_of_one(refiner, batch_problems):
    p = batch_problems[1]
    a = refiner.refine(p.targets, p.camera, p.rotation_cam, p.translation, p.expression, p.identity,
                       exp_prior=p.exp_prior, exp_prev=p.exp_prev)
    b = refiner.refine_batch([p])[0]
    assert np.allclose(a.expression, b.expression) and a.iterations == b.iterations


def _cuda_reason() -> str | None:
    if not prdl.cupy_available():
        return "CuPy is not installed (the CuPy path of refine_batch needs CuPy and a CUDA device)"
    import cupy

    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA device"
    except Exception as exc:  # noqa: BLE001
        return f"no CUDA device ({exc.__class__.__name__})"
    return None


def test_cupy_batch_matches_numpy(refiner, batch_problems):  # pragma: no cover - needs a GPU
    """Same code on CuPy: float32 descriptors summed in another order can flip a near-tied LM acceptance,
    so the tolerance is on the answer (expression within 0.02, loss within 2 %), not bitwise."""
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)
    import cupy

    ref = refiner.refine_batch(batch_problems)
    got = refiner.refine_batch(batch_problems, xp=cupy)
    for a, b in zip(ref, got):
        assert isinstance(b.expression, np.ndarray)
        assert np.abs(a.expression - b.expression).max() < 0.02
        assert b.loss_after == pytest.approx(a.loss_after, rel=0.02, abs=1e-3)
        assert b.loss_after <= b.loss_before


def test_unweighted_parts_are_left_out_without_changing_the_answer(refiner, batch_problems):
    """A part no face weighs is dropped from the solve (landmark masks weigh 5 of 8 parts); the same face next
    to one that weighs every part (so its zero-weight parts stay in the arrays) gets the same answer."""
    from dataclasses import replace

    from engine.refine import LANDMARK_MASK_PART_WEIGHTS

    p = replace(batch_problems[2], part_weights=LANDMARK_MASK_PART_WEIGHTS)
    alone = refiner.refine_batch([p])[0]
    beside = refiner.refine_batch([p, batch_problems[3]])[0]
    assert not any(u for w, u in zip(LANDMARK_MASK_PART_WEIGHTS, alone.used_parts) if w == 0)
    assert beside.used_parts == alone.used_parts
    assert np.allclose(alone.expression, beside.expression, atol=1e-4)
    assert alone.loss_after == pytest.approx(beside.loss_after, rel=1e-4)


def test_the_other_array_module_path_runs_here(refiner, batch_problems):
    """Where refine_batch branches on `xp is numpy` (identity shapes from the host cache, reduceat segment
    sums), an array module that is not NumPy -- CuPy on a GPU -- takes the other branch. NumPy under another
    name takes it on this CPU: same answers."""
    import types

    class OtherModule(types.ModuleType):
        def __getattr__(self, name):
            return getattr(np, name)

    a = refiner.refine_batch(batch_problems[:3])
    b = refiner.refine_batch(batch_problems[:3], xp=OtherModule("numpy_as_another_module"))
    for x, y in zip(a, b):  # the other path sums in float32 over all slots, scatter-adds cell means: ~2e-6
        assert np.allclose(x.expression, y.expression, atol=1e-5)
        assert x.loss_after == pytest.approx(y.loss_after, rel=1e-5)


def test_a_face_off_its_crop_is_left_as_it_was(refiner, batch_problems):
    """No candidate lands in the crop: nothing to compare, the face comes back unchanged, on either path."""
    import types
    from dataclasses import replace

    class OtherModule(types.ModuleType):
        def __getattr__(self, name):
            return getattr(np, name)

    p = replace(batch_problems[0], translation=np.asarray(batch_problems[0].translation) + np.array([200.0, 0.0, 0.0]))
    for xp in (None, OtherModule("numpy_as_another_module")):
        r = refiner.refine_batch([p], xp=xp)[0]
        assert r.loss_before == r.loss_after == 0.0 and not any(r.used_parts)
        assert np.allclose(r.translation, p.translation)
