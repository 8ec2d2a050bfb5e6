"""The torch refinement (`engine.refine_torch`): NumPy's answers, no host read (so a CUDA graph can hold it),
faces independent of their batch (so padding a bucket changes nothing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _agrees(ref, got):
    """float32 sums in another order can flip a candidate between two cells or a near-tied LM acceptance, so
    the tolerance is on the answer (as CuPy's): expression within 0.02, loss within 2 %; most faces agree to
    1e-5 (on this CPU: median 3e-6 over 32 faces, largest 4e-3)."""
    close = 0
    for a, b in zip(ref, got):
        assert np.abs(a.expression - b.expression).max() < 0.02
        assert np.abs(a.rotation_cam - b.rotation_cam).max() < 1e-3
        assert b.loss_after == pytest.approx(a.loss_after, rel=0.02, abs=1e-3)
        assert b.loss_before == pytest.approx(a.loss_before, rel=1e-4)
        assert b.loss_after <= b.loss_before
        assert a.used_parts == b.used_parts and a.iterations == b.iterations
        close += np.abs(a.expression - b.expression).max() < 1e-4
    assert close >= len(ref) // 2


def test_torch_refinement_gives_numpy_answers(refiner, batch_problems):
    from engine.refine_torch import TorchRefiner

    _agrees(refiner.refine_batch(batch_problems), TorchRefiner(refiner).refine(batch_problems))


def test_landmark_mask_weights_and_a_face_off_its_crop(refiner, batch_problems):
    """Parts no face weighs are left out (the landmark masks' weights); a face with no candidate in its crop comes
    back unchanged with nothing used."""
    from dataclasses import replace

    from engine.refine import LANDMARK_MASK_PART_WEIGHTS
    from engine.refine_torch import TorchRefiner

    lm = [replace(p, part_weights=LANDMARK_MASK_PART_WEIGHTS) for p in batch_problems[:2]]
    _agrees(refiner.refine_batch(lm), TorchRefiner(refiner).refine(lm))
    off = replace(batch_problems[0], translation=np.asarray(batch_problems[0].translation) + np.array([200.0, 0.0, 0.0]))
    r = TorchRefiner(refiner).refine([off])[0]
    assert r.loss_before == r.loss_after == 0.0 and not any(r.used_parts)
    assert np.allclose(r.translation, off.translation)


def test_faces_do_not_depend_on_their_batch(refiner, batch_problems):
    """A CUDA graph pads a batch to its bucket by repeating the first face: the real faces' answers must not
    change (each face's keys, sums and solves are its own)."""
    from engine.refine_torch import TorchRefiner

    tr = TorchRefiner(refiner)
    alone = tr.refine(batch_problems[1:3])
    padded = tr.refine(batch_problems[1:3] + [batch_problems[1]] * 6)
    for a, b in zip(alone, padded):
        assert np.allclose(a.expression, b.expression, atol=1e-6)
        assert a.loss_after == pytest.approx(b.loss_after, rel=1e-6)


class _HostReads(TorchDispatchMode):
    """Records the operators that read a tensor's value back to the host (``item``, ``bool(t)``, ``int(t)``),
    or whose output shape depends on values (``nonzero``, boolean masks): none of them can be captured."""

    BANNED = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount", "argwhere")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if any(b in name for b in self.BANNED):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_the_solve_reads_nothing_back(refiner, batch_problems):
    """What a CUDA graph needs, checked on the CPU: the whole solve dispatches no operator that reads values back.
    (The same mode catches a Python branch on a tensor: that is a ``_local_scalar_dense`` call.)"""
    from engine.refine_torch import TorchRefiner

    tr = TorchRefiner(refiner)
    inp = refiner.batch_inputs(batch_problems[:3])
    c = tr._constants_for(inp.parts)
    args = [torch.as_tensor(a) for a in inp.solve_arrays()]
    with _HostReads() as mode:
        out = tr._solve(c, *args)
    assert mode.seen == [], mode.seen
    assert out.shape == (3, 9 + 3 + refiner.model.n_exp + 3 + len(inp.parts))
    # and the mode does see a host read where there is one
    with _HostReads() as mode:
        bool(args[2].sum() > 0)
    assert mode.seen


def test_cuda_graph_refinement_matches_numpy(refiner, batch_problems):  # pragma: no cover - needs a GPU
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: no CUDA device is visible (torch.cuda.is_available() is False)")
    from engine.refine_torch import TorchRefiner

    ref = refiner.refine_batch(batch_problems)
    tr = TorchRefiner(refiner, "cuda")
    _agrees(ref, tr.refine(batch_problems))  # captures the bucket of 8
    assert not tr.graphs.errors, tr.graphs.errors
    assert len(tr.graphs.graphs) == 1
    _agrees(ref, tr.refine(batch_problems))  # replay
    _agrees(ref[:3], tr.refine(batch_problems[:3]))  # the bucket of 4, padded
    tr.graphs.enabled = False
    _agrees(ref, tr.refine(batch_problems))  # eager on the GPU


def test_warm_captures_every_bucket_for_both_part_sets(refiner):  # pragma: no cover - needs a GPU
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: no CUDA device is visible (torch.cuda.is_available() is False)")
    from engine.refine_torch import TorchRefiner

    tr = TorchRefiner(refiner, "cuda")
    assert tr.warm(8) == 2 * 4  # buckets 1, 2, 4, 8 x (all parts, the landmark masks' parts)
    assert not tr.graphs.errors, tr.graphs.errors


def test_warm_is_a_no_op_off_cuda(refiner):
    from engine.refine_torch import TorchRefiner

    assert TorchRefiner(refiner, "cpu").warm(8) == 0
