"""The batched PRDL refinement in torch, without a host read, captured in one CUDA graph per batch size.

`PrdlRefiner.refine_batch` on CuPy is ~90 small kernels per evaluation and several evaluations per call; on a GPU
its time is launch and dispatch overhead (31 ms for one face on an H200, 71 ms for 64). A CUDA graph removes
that overhead, but CuPy refuses any cuBLAS call during stream capture (its matrix products and solves); torch
captures them. So on a CUDA device the refinement runs here: the same solve as `refine_batch` -- the candidates'
projection, splat visibility, cell grouping, PRDL residuals and Gauss-Newton terms, the same LM schedule -- on
torch tensors with no host read (no data-dependent shape, no Python branch on a tensor), so that
`engine.cuda_graphs` captures one whole call per batch bucket.

Where it differs from the array-module code, and why:
* the LM loop always runs its ``iterations`` x ``lm_trials`` trials; a face that has accepted a step, or has
  converged, takes zero steps (as in `refine_batch`, which also exits early once no face is left): same answers;
* a face whose trials were all rejected keeps the state of the iteration's start (`refine_batch` evaluates it
  again);
* cell means are differences of a cumulative sum over the sorted candidates (each cell's members are adjacent),
  and groups are ranked within their part by a binary search: scatter-adds would send every hidden candidate
  to one spare slot, which serialises a GPU's atomics;
* squared distances are formed directly (float32), not by an augmented matrix product.
Answers agree with NumPy's to float32 rounding (tests: `tests/test_refine_torch.py`).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx.experimental._config as fx_config

from engine import prdl
from engine.cuda_graphs import GraphCache, bucket_for
from engine.refine import CROP_UNITS, PrdlRefiner, RefineProblem, RefineResult

SPLAT_MIN_CELL = 0.5  # crop units: the splat z-buffer's smallest cell (`PrdlRefiner`), which sizes its key grid
H_CELLS = 512  # cell grouping: cells per axis either side of 0 (10-bit keys), as `engine.refine.select_cells`


class TorchRefiner:
    """A `PrdlRefiner`'s solve on a torch device: `refine` is `PrdlRefiner.refine_batch` for a batch."""

    def __init__(self, refiner: PrdlRefiner, device: torch.device | str = "cpu", compiled: bool = False):
        self.refiner = refiner
        self.device = torch.device(device)
        self.graphs = GraphCache(self.device)  # on CUDA: one graph per (bucket, parts, anchors)
        self._constants: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        # ``compiled``: torch.compile (inductor) fuses the solve's ~2,100 small operators (views not counted) into
        # far fewer kernels before the graph captures them. Compiled with a symbolic batch size, it compiles three
        # times per part set (inductor's sort lowering splits at 32,767 keys: batches 1-3, 4, 5+), 90-145 s each on
        # this 2-core CPU, so only the benchmark tries it for now.
        self._compiled = torch.compile(self._solve, fullgraph=True, dynamic=True) if compiled else None

    def _solve_fn(self, *args):
        if self._compiled is None:
            return self._solve(*args)
        # no duck sizing: a batch the size of a fixed dimension (4 = camera parameters) must not specialise
        with fx_config.patch(use_duck_shape=False):
            return self._compiled(*args)

    def refine(self, problems: list[RefineProblem]) -> list[RefineResult]:
        if not problems:
            return []
        inp = self.refiner.batch_inputs(problems)
        c = self._constants_for(inp.parts)
        check_key_bits(max(len(problems), bucket_for(len(problems)) or 0), len(inp.parts), int(c["cand_part"].shape[0]))
        out = self.graphs.run(lambda *t: self._solve_fn(c, *t), inp.solve_arrays(),
                              key=(inp.parts, inp.anchors.shape[2]))
        out = out.cpu().numpy()  # one transfer: (B, 9 + 3 + n_exp + 3 + q)
        B, n_e = len(problems), inp.expression.shape[1]
        rc, t, e = out[:, :9].reshape(B, 3, 3), out[:, 9:12], out[:, 12:12 + n_e]
        lb, la, its = out[:, 12 + n_e], out[:, 13 + n_e], out[:, 14 + n_e]
        return self.refiner.results(inp, rc, t, e, lb, la, its, out[:, 15 + n_e:] > 0.5)

    def warm(self, max_batch: int) -> int:
        """On CUDA, capture the graphs of every bucket up to the one holding ``max_batch`` for the two part sets in
        use (the landmark masks' and all parts), on a synthetic face, so that no live frame waits for a capture.
        Returns the number of captured graphs (0 off CUDA)."""
        from dataclasses import replace

        from engine.cuda_graphs import BUCKETS
        from engine.refine import LANDMARK_MASK_PART_WEIGHTS, synthetic_problems

        if self.device.type != "cuda":
            return 0
        face = synthetic_problems(self.refiner, 1)[0]
        for weights in (None, LANDMARK_MASK_PART_WEIGHTS):
            problem = replace(face, part_weights=weights)
            for b in BUCKETS:
                self.refine([problem] * b)
                if b >= max_batch:
                    break
        return len(self.graphs.graphs)

    def _constants_for(self, parts: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The refiner's constants for ``parts`` on this device (uploaded once per part set)."""
        with self._lock:  # refine stages of several schedulers may share this refiner
            if parts not in self._constants:
                if len(self._constants) >= 8:  # a handful of part sets in use at once (graphs keep theirs alive)
                    self._constants.clear()
                host = self.refiner.constant_arrays(parts)
                host["free"] = (~self.refiner.fixed_exp).astype(np.float64)
                host["channel_weights"] = np.asarray(self.refiner.config.channel_weights, np.float32)
                host["cross"] = CROSS_MATRIX
                self._constants[parts] = {k: torch.as_tensor(v, device=self.device) for k, v in host.items()}
            return self._constants[parts]

    # ------------------------------------------------------------------ the solve (no host reads)
    def _solve(self, c, aff, cam, E, P0, Pv, tw, RC, T, ident, anchors, tdesc, tvalid, cells, weights):
        """Face-major inputs as `engine.refine.BatchInputs`; returns (B, 9 + 3 + n_exp + 3 + q): rotation,
        translation, expression, loss before, loss after, iterations, parts used."""
        ref, cfg = self.refiner, self.refiner.config
        B, q, A = anchors.shape[:3]
        pm = ref.pmax
        cand_part, basis_c, fi = c["cand_part"], c["basis_free"], c["free_idx"]
        C, nf = int(cand_part.shape[0]), int(fi.shape[0])
        n = 6 + nf
        f32 = torch.float32
        anchors, tdesc = anchors.reshape(B * q, A, 2), tdesc.reshape(B * q, A, 3)
        tvalid, weights = tvalid.reshape(-1), weights.reshape(-1)
        base = (c["neutral"] + (ident @ c["id_flat"]).view(B, C, 3)).to(f32)
        face_base = (c["face_neutral"] + (ident @ c["face_id_flat"]).view(B, -1, 3)).to(f32)
        # camera and crop affine as one map per face: crop = M (f * (x, y) / z + c) + b = (M diag f) (x, y) / z + t
        M = aff[:, :4].view(B, 2, 2)
        lin_t = (M * cam[:, None, :2]).transpose(1, 2).to(f32)
        shift = ((M @ cam[:, 2:4, None])[..., 0] + aff[:, 4:6]).to(f32)[:, None, :]

        def project(X, RC_, T_):
            """Model points (B, S, 3) -> crop points (B, S, 2), camera points (B, S, 3), float32."""
            pc = X @ RC_.transpose(1, 2).to(f32) + T_.to(f32)[:, None, :]
            return (pc[..., :2] / pc[..., 2:]) @ lin_t + shift, pc

        def candidates(E_, RC_, T_):
            return project(base + (E_.to(f32)[:, None, :] @ c["exp_flat"])[:, 0].view(B, C, 3), RC_, T_)

        # prior cost = sum over free shapes of prior (E - P0)^2 + tw (E - Pv)^2, as a quadratic in E (fewer kernels)
        qa = c["free"] * (cfg.prior + tw)
        qb = c["free"] * (cfg.prior * P0 + tw * Pv)
        qc = (c["free"] * (cfg.prior * P0 * P0 + tw * Pv * Pv)).sum(1)

        def prior_cost(E_):
            return ((qa * E_ - 2.0 * qb) * E_).sum(1) + qc

        def evaluate(E_, RC_, T_, projected=None, gradient=True):
            uvc, pcc = candidates(E_, RC_, T_) if projected is None else projected
            sel = select_cells(uvc, visible, cand_part, cells, q, pm)
            uv = sel.means(uvc.reshape(-1, 2)).view(B * q, pm, 2).to(f32)
            r, terms = prdl_terms(uv, sel.mask, tdesc, anchors, weights, tvalid, c["channel_weights"], gradient)
            return _State(pcc, sel, terms, (r.double() ** 2).reshape(B, -1).sum(1))

        uvc, pcc = candidates(E, RC, T)
        # visibility, once per call: each candidate's depth against a point-splat z-buffer of the face surface
        face = face_base + (E.to(f32)[:, None, :] @ c["face_exp"])[:, 0].view(face_base.shape)
        face_uv, face_pc = project(face, RC, T)
        px_per_cm = torch.sqrt(aff[:, 0] ** 2 + aff[:, 2] ** 2) * cam[:, 0] / T[:, 2].clamp_min(1e-3)
        splat = (0.3 * px_per_cm).clamp_min(SPLAT_MIN_CELL)
        visible = splat_visibility(face_uv, face_pc[..., 2], uvc, pcc[..., 2], splat, CROP_UNITS, c["vis_tol"])
        st = evaluate(E, RC, T, (uvc, pcc))
        loss_before = st.loss
        rc0, t0, e0 = RC, T, E
        lam = torch.full((B,), cfg.damping, dtype=torch.float64, device=E.device)
        alive = torch.ones(B, dtype=torch.bool, device=E.device)
        iters = torch.zeros(B, dtype=torch.float64, device=E.device)
        eye = torch.eye(n, dtype=torch.float64, device=E.device)
        for it in range(1, cfg.iterations + 1):
            last = it == cfg.iterations
            # Jacobian of each cell's mean from its representative (the member nearest the cell centre)
            rep = st.sel.rep
            sbasis = basis_c[rep % C].view(B, q * pm, 3, nf)
            pc_rep = st.pcc.reshape(-1, 3)[rep].view(B, q * pm, 3)
            jtr = slot_gradient(st.terms.grad.view(B, q * pm, 2), pc_rep, T, RC, sbasis, cam, aff)
            if it == 1:  # later iterations keep this Gauss-Newton matrix and take a fresh gradient
                jac = slot_jacobian(pc_rep, T, RC, sbasis, cam, aff)
                jtj0 = normal_equations(jac.view(B * q, pm, 2, n), st.terms, B, cfg.mean_anchor_stride).double()
            total = st.loss + prior_cost(E)
            Ef = E[:, fi]
            jtr = torch.cat([jtr[:, :6], jtr[:, 6:] + cfg.prior * (Ef - P0[:, fi]) + tw * (Ef - Pv[:, fi])], 1)
            jtj = jtj0 + torch.diag_embed(torch.cat([torch.zeros(B, 6, dtype=torch.float64, device=E.device),
                                                     (cfg.prior + tw).expand(B, nf)], 1))
            pose = torch.full((B, 6), bool(cfg.refine_pose), device=E.device)
            act = torch.cat([pose, ~(((Ef <= 0.0) & (jtr[:, 6:] > 0)) | ((Ef >= 1.0) & (jtr[:, 6:] < 0)))], 1)
            actf = act.double()
            hh = jtj * actf[:, :, None] * actf[:, None, :]
            hdiag = torch.diagonal(hh, dim1=1, dim2=2)
            pending = alive.clone()
            start = st
            for _ in range(cfg.lm_trials):  # Levenberg-Marquardt: shrink the step until the objective drops
                h = hh + eye * (lam[:, None] * (hdiag + 1e-6) + (1.0 - actf))[:, None, :]
                # solve_ex without its error check (a device-to-host read); the damped diagonal keeps h regular
                delta = -torch.linalg.solve_ex(h, (jtr * actf)[..., None], check_errors=False)[0][..., 0]
                delta = delta * pending[:, None]  # faces that are not trying a step are evaluated where they are
                RCn = rodrigues(delta[:, :3], c["cross"]) @ RC
                Tn = T + delta[:, 3:6]
                En = E.index_copy(1, fi, (E[:, fi] + delta[:, 6:]).clamp(0.0, 1.0))  # E: an accepted face has moved
                trial = evaluate(En, RCn, Tn, gradient=not last)
                ok = pending & (trial.loss + prior_cost(En) < total)
                RC = torch.where(ok[:, None, None], RCn, RC)
                T = torch.where(ok[:, None], Tn, T)
                E = torch.where(ok[:, None], En, E)
                lam = torch.where(ok, (lam * 0.3).clamp_min(1e-4), torch.where(pending, lam * 10.0, lam))
                pending = pending & ~ok
            # a face that accepted a step has its state in the last trial (evaluated where it now is); one whose
            # trials all failed has not moved since the iteration's start
            st = _State.where(pending, start, trial)
            iters = iters + alive.double()
            converged = (total - (st.loss + prior_cost(E))) < cfg.tolerance * total
            alive = alive & ~pending & ~converged
        used = (tvalid & st.sel.mask.any(1) & (weights != 0)).view(B, q)
        worse = st.loss > loss_before  # (the prior can trade a little PRDL loss): never worse than the start
        RC = torch.where(worse[:, None, None], rc0, RC)
        T = torch.where(worse[:, None], t0, T)
        E = torch.where(worse[:, None], e0, E)
        loss_after = torch.where(worse, loss_before, st.loss)
        return torch.cat([RC.reshape(B, 9), T, E, loss_before[:, None], loss_after[:, None], iters[:, None],
                          used.double()], 1)


@dataclass
class Terms:
    """The compact point Jacobian of the PRDL residuals (as `engine.prdl.GNTerms`, per-part anchors)."""

    grad: torch.Tensor  # (P, pm, 2) d loss / d points
    index: torch.Tensor  # (P, A, 2) argmin, argmax point per anchor
    unit: torch.Tensor  # (P, A, 2, 2) d(min / max residual) / d(its point)
    inv_dist: torch.Tensor  # (P, A, pm)
    mean_scale: torch.Tensor  # (P,)
    points: torch.Tensor  # (P, pm, 2), padded entries filled with the part's first point
    mask: torch.Tensor  # (P, pm)
    anchors: torch.Tensor  # (P, A, 2)

    def where(self, cond: torch.Tensor, other: "Terms") -> "Terms":
        """Per face (``cond`` (B,)): self where true, ``other`` elsewhere (parts are face-major)."""
        return Terms(*(_where_faces(cond, a, b) for a, b in zip(self._fields(), other._fields())))

    def _fields(self):
        return (self.grad, self.index, self.unit, self.inv_dist, self.mean_scale, self.points, self.mask,
                self.anchors)


@dataclass
class Cells:
    """`select_cells`'s grouping: slots (face, part, k), flat, S = B * q * pm of them."""

    rep: torch.Tensor  # (S,) flat candidate index b*C + c nearest each cell's centre (0 where empty)
    count: torch.Tensor  # (S,) members per slot
    start: torch.Tensor  # (S,) the slot's first member's position in ``order``
    order: torch.Tensor  # (N,) flat candidate index of each sorted position (hidden ones last)
    visible: torch.Tensor  # (N,) sorted position holds a visible candidate
    mask: torch.Tensor  # (B*q, pm) slots in use

    def means(self, values: torch.Tensor) -> torch.Tensor:
        """Per-slot means (S, d) of candidate values (B*C, d): a group's members are adjacent in sorted order, so
        its sum is a difference of one float64 cumulative sum."""
        v = values[self.order].double() * self.visible[:, None]
        cs = torch.cat([torch.zeros_like(v[:1]), torch.cumsum(v, 0)])
        sums = cs[self.start + self.count] - cs[self.start]
        return sums / self.count.clamp_min(1)[:, None]

    def where(self, cond: torch.Tensor, other: "Cells") -> "Cells":
        """Only what a state carries past its iteration: representatives and the slots in use."""
        return Cells(_where_faces(cond, self.rep, other.rep), self.count, self.start, self.order, self.visible,
                     _where_faces(cond, self.mask, other.mask))


@dataclass
class _State:
    pcc: torch.Tensor  # (B, C, 3) camera points of all candidates
    sel: Cells
    terms: Terms | None  # None after the last iteration (only the loss is needed)
    loss: torch.Tensor  # (B,)

    @staticmethod
    def where(cond: torch.Tensor, a: "_State", b: "_State") -> "_State":
        """Per face: ``a`` where ``cond``, else ``b`` (a state without Jacobian terms gives none)."""
        terms = a.terms.where(cond, b.terms) if a.terms is not None and b.terms is not None else None
        return _State(_where_faces(cond, a.pcc, b.pcc), a.sel.where(cond, b.sel), terms,
                      torch.where(cond, a.loss, b.loss))


# a vector k times this (3, 9) matrix is k's cross-product matrix [k]x, row-major
CROSS_MATRIX = np.zeros((3, 9))
CROSS_MATRIX[2, 1], CROSS_MATRIX[1, 2], CROSS_MATRIX[2, 3] = -1.0, 1.0, 1.0
CROSS_MATRIX[0, 5], CROSS_MATRIX[1, 6], CROSS_MATRIX[0, 7] = -1.0, -1.0, 1.0


def rodrigues(w: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """(B, 3) axis-angle -> (B, 3, 3), as `engine.refine.batched_rodrigues` (``cross``: `CROSS_MATRIX`)."""
    theta = torch.linalg.vector_norm(w, dim=1)
    K = ((w / theta.clamp_min(1e-12)[:, None]) @ cross).view(-1, 3, 3)
    s, c = torch.sin(theta)[:, None, None], torch.cos(theta)[:, None, None]
    return torch.eye(3, dtype=w.dtype, device=w.device) + s * K + (1.0 - c) * (K @ K)


def _where_faces(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where ``cond`` (B,) else ``b``, for face-major arrays whose leading dim is B times anything."""
    k = a.shape[0] // cond.shape[0]
    m = cond[:, None].expand(-1, k).reshape(-1)  # (a plain expand: no output size to compute on the device)
    return torch.where(m.view((-1,) + (1,) * (a.dim() - 1)), a, b)


def splat_visibility(occ_uv, occ_z, uv, z, cell, size: float, tol):
    """`engine.refine.splat_visibility` without host reads: the key grid is sized for the smallest cell the
    refinement uses, each face's own grid bounds its cells."""
    B = occ_uv.shape[0]
    G = int(math.ceil(size / SPLAT_MIN_CELL)) + 1
    cellb = cell[:, None]
    Gb = torch.ceil(size / cellb) + 1
    faces = torch.arange(B, device=uv.device)[:, None]

    def cells(p):
        gx, gy = torch.floor(p[..., 0] / cellb), torch.floor(p[..., 1] / cellb)
        ok = (gx >= 0) & (gx < Gb) & (gy >= 0) & (gy < Gb)
        return ok, (faces * G + torch.where(ok, gy, 0).long()) * G + torch.where(ok, gx, 0).long()

    ok_o, k_o = cells(occ_uv)
    ok_o = ok_o & torch.isfinite(occ_z)
    zmin = torch.where(ok_o, occ_z, math.inf).amin(1, keepdim=True)
    zmin = torch.where(torch.isfinite(zmin), zmin, 0.0)
    zbits = 20  # depth in 1/4096 cm steps over 256 cm behind the face's nearest vertex
    zq = torch.where(ok_o, (occ_z - zmin) * 4096.0, 0.0).clamp(0, (1 << zbits) - 1).long()
    n_cells = B * G * G
    sk = torch.sort(torch.where(ok_o, (k_o << zbits) + zq, n_cells << zbits).reshape(-1)).values
    cell_of = sk >> zbits
    first = torch.cat([cell_of[:1] >= 0, cell_of[1:] != cell_of[:-1]]) & (cell_of < n_cells)
    zb = torch.full((n_cells + 1,), math.inf, dtype=torch.float64, device=uv.device)
    slot = torch.where(first, cell_of, n_cells)
    zb[slot] = zmin[(slot // (G * G)).clamp_max(B - 1), 0].double() + (sk & ((1 << zbits) - 1)) / 4096.0
    zb[n_cells] = math.inf
    ok, k = cells(uv)
    return ok & (z <= zb[k] + tol)


def check_key_bits(batch: int, q: int, C: int) -> None:
    """`select_cells` packs (face, part) | cell y | cell x | distance | candidate into one int64 sort key."""
    if ((batch * q + 1) << (30 + max(C - 1, 1).bit_length())).bit_length() > 63:
        raise ValueError(f"select_cells: a batch of {batch} faces x {C} candidates overflows the 64-bit sort keys")


def select_cells(uv, visible, cand_part, cells, q: int, pm: int) -> Cells:
    """`engine.refine.select_cells` without host reads (the same keys, sort, ranking and slots)."""
    B, C, _ = uv.shape
    dev = uv.device
    inv = (1.0 / cells[:, cand_part]).to(uv.dtype)
    fx, fy = uv[..., 0] * inv, uv[..., 1] * inv
    gx, gy = torch.floor(fx), torch.floor(fy)
    ok = visible & (gx >= -H_CELLS) & (gx < H_CELLS) & (gy >= -H_CELLS) & (gy < H_CELLS)
    fx, fy = fx - (gx + 0.5), fy - (gy + 0.5)
    dq = torch.where(ok, ((fx * fx + fy * fy) * 2048.0).clamp_max(1023.0), 0.0).long()  # 10 bits
    gx = torch.where(ok, gx + H_CELLS, 0).long() & 1023
    gy = torch.where(ok, gy + H_CELLS, 0).long() & 1023
    fp = torch.arange(B, device=dev)[:, None] * q + cand_part[None, :]  # flat (face, part)
    cbits = max(C - 1, 1).bit_length()
    big = B * q  # (`check_key_bits`: the caller checks that the keys fit, outside the traced solve)
    cell = (torch.where(ok, fp, big) << 20) | (gy << 10) | gx
    skey = torch.sort(((((cell << 10) | dq) << cbits) | torch.arange(C, device=dev)[None, :]).reshape(-1)).values
    N, S = skey.shape[0], B * q * pm
    sk = skey >> (10 + cbits)  # cell
    gpart_m = sk >> 20  # (face, part) of each sorted candidate; ``big`` for a hidden one
    vis = gpart_m < big
    order = (gpart_m.clamp_max(big - 1) // q) * C + (skey & ((1 << cbits) - 1))
    new = vis & torch.cat([vis[:1], sk[1:] != sk[:-1]])
    gid = torch.cumsum(new, 0) - 1  # group of each sorted candidate
    pos = torch.arange(N, device=dev)
    gi = torch.where(new, gid, N)  # groups at their full possible count, one spare entry for the rest
    n_vis = vis.sum()
    start = torch.zeros(N + 1, dtype=torch.long, device=dev) + n_vis  # groups past the last one: empty
    start[gi] = pos
    start[N] = n_vis
    size = start[1:] - start[:-1]  # members per group
    gpart = torch.full((N + 1,), big, dtype=torch.long, device=dev)
    gpart[gi] = gpart_m
    gpart = gpart[:N]  # non-decreasing: groups of a (face, part) are adjacent, unused entries ``big``
    part_start = torch.searchsorted(gpart, torch.arange(big, device=dev))
    rank = torch.arange(N, device=dev) - part_start[gpart.clamp_max(big - 1)]
    slot = torch.where((gpart < big) & (rank < pm), gpart * pm + rank, S)  # S: dropped
    count = torch.zeros(S + 1, dtype=torch.long, device=dev)
    count[slot] = size
    first = torch.zeros(S + 1, dtype=torch.long, device=dev)
    first[slot] = start[:N]
    rep = torch.zeros(S + 1, dtype=torch.long, device=dev)
    rep[slot] = order[start[:N].clamp_max(N - 1)]  # the first member: nearest the centre
    count, first, rep = count[:S], first[:S], rep[:S]
    return Cells(rep, count, first, order, vis, (count > 0).view(B * q, pm))


def prdl_terms(pts, mask, tdesc, anchors, weights, tvalid, chw, gradient: bool):
    """PRDL residuals (P, A, 3) of predicted points (P, pm, 2) against target descriptors, per-part anchors
    (P, A, 2); with ``gradient`` their compact point Jacobian (`Terms`), else None. As
    `engine.prdl.gauss_newton_terms` / `weighted_residuals`."""
    P, pm, _ = pts.shape
    A = anchors.shape[1]
    eps = prdl.EPS
    used = mask.any(1) & tvalid & (weights != 0)
    sw = torch.sqrt(torch.where(used, weights, 0.0)[:, None] * chw[None, :] / A)  # (P, 3)
    first = torch.argmax(mask.to(torch.uint8), 1)  # 0 for an empty part
    rows = torch.arange(P, device=pts.device)
    filled = torch.where(mask[..., None], pts, pts[rows, first][:, None, :])
    diff = anchors[:, :, None, :] - filled[:, None, :, :]
    d = torch.sqrt((diff * diff).sum(-1) + eps)  # (P, A, pm)
    counts = mask.sum(1)
    dmin, imin = d.min(-1)
    dmax, imax = d.max(-1)
    mean = (d * mask[:, None, :]).sum(-1) / counts.clamp_min(1)[:, None]
    desc = torch.stack([dmin, dmax, mean], -1) * (counts > 0)[:, None, None]
    r = sw[:, None, :] * (desc - tdesc)
    if not gradient:
        return r, None
    # a padded entry can only tie with the part's first valid point: hand it back to that point
    idx = torch.stack([torch.where(mask[rows[:, None], i], i, first[:, None]) for i in (imin, imax)], -1)
    vsel = filled[rows[:, None, None], idx]  # (P, A, 2, 2)
    dsel = desc[..., :2, None].clamp_min(math.sqrt(eps))
    unit = (vsel - anchors[:, :, None, :]) * (sw[:, None, :2, None] / dsel)
    inv_d = 1.0 / d
    mean_scale = sw[:, 2] / counts.clamp_min(1)
    rr = 2.0 * r
    flat = ((idx + (rows * pm)[:, None, None])[..., None] * 2 + torch.arange(2, device=pts.device)).reshape(-1)
    g = torch.zeros(P * pm * 2, dtype=torch.float64, device=pts.device)
    g = g.index_add_(0, flat, (rr[..., :2, None] * unit).reshape(-1).double()).to(pts.dtype).view(P, pm, 2)
    cm = rr[..., 2] * mean_scale[:, None]  # (P, A)
    s = torch.stack([cm, cm * anchors[..., 0], cm * anchors[..., 1]], 1) @ inv_d  # (P, 3, pm)
    g = torch.stack([g[..., 0] + filled[..., 0] * s[:, 0] - s[:, 1], g[..., 1] + filled[..., 1] * s[:, 0] - s[:, 2]],
                    -1) * mask[..., None]
    return r, Terms(g, idx, unit, inv_d, mean_scale, filled, mask, anchors)


def _projection_rows(pc, cam, aff):
    """d(crop x, crop y)/d(camera point) (B, S, 2, 3), as `engine.refine._projection_rows`."""
    iz = 1.0 / pc[..., 2]
    fx, fy = cam[:, None, 0] * iz, cam[:, None, 1] * iz
    rows = []
    for i in range(2):
        a0, a1 = aff[:, None, 2 * i] * fx, aff[:, None, 2 * i + 1] * fy  # crop_i = m0 u + m1 v + b_i
        rows.append(torch.stack([a0, a1, -(a0 * pc[..., 0] + a1 * pc[..., 1]) * iz], -1))
    return torch.stack(rows, 2).to(pc.dtype)


def slot_jacobian(pc, T, RC, sbasis, cam, aff):
    """As `engine.refine.slot_jacobian`: (B, S, 2, 6 + n_e) in ``sbasis``'s dtype."""
    B, S = pc.shape[:2]
    a = _projection_rows(pc, cam, aff)
    r = (pc - T[:, None, :]).to(a.dtype)[:, :, None, :].expand_as(a)
    rot = torch.linalg.cross(r, a, dim=-1)
    ra = (a.reshape(B, S * 2, 3).double() @ RC).view(B, S, 2, 3).to(sbasis.dtype)  # RC^T a per row
    return torch.cat([rot.to(sbasis.dtype), a.to(sbasis.dtype), ra @ sbasis], -1)


def slot_gradient(grad, pc, T, RC, sbasis, cam, aff):
    """As `engine.refine.slot_gradient`: J^T r (B, 6 + n_e) without forming the Jacobian."""
    B = pc.shape[0]
    a = _projection_rows(pc, cam, aff)
    w = grad[..., 0, None] * a[:, :, 0] + grad[..., 1, None] * a[:, :, 1]  # (B, S, 3)
    m = (pc - T[:, None, :]).transpose(1, 2) @ w.double()  # sum of r w^T: its antisymmetric part is sum r x w
    rot = torch.stack([m[:, 1, 2] - m[:, 2, 1], m[:, 2, 0] - m[:, 0, 2], m[:, 0, 1] - m[:, 1, 0]], 1)
    rw = (w.double() @ RC).to(sbasis.dtype)  # RC^T w per point
    exp = (rw.reshape(B, 1, -1) @ sbasis.reshape(B, -1, sbasis.shape[-1]))[:, 0]
    return 0.5 * torch.cat([rot, w.double().sum(1), exp.double()], 1)


def normal_equations(points_jac, terms: Terms, n_faces: int, mean_anchor_stride: int = 1):
    """As `engine.refine.batched_normal_equations` (every slot kept): per-face J^T J (B, n, n)."""
    dt = points_jac.dtype
    P, pm = terms.mask.shape
    B = int(n_faces)
    n = points_jac.shape[-1]
    G = points_jac * terms.mask[..., None, None]
    Gb = G.view(B, -1, 2, n)
    flat = (terms.index + (torch.arange(P, device=G.device) * pm)[:, None, None]).reshape(-1)
    u = terms.unit.reshape(-1, 2).double()

    def per_point(x):
        s = torch.zeros(P * pm, dtype=torch.float64, device=G.device).index_add_(0, flat, x)
        return s.to(dt).view(B, -1, 1)

    sxx, sxy, syy = per_point(u[:, 0] * u[:, 0]), per_point(u[:, 0] * u[:, 1]), per_point(u[:, 1] * u[:, 1])
    SG = torch.stack([sxx * Gb[:, :, 0] + sxy * Gb[:, :, 1], sxy * Gb[:, :, 0] + syy * Gb[:, :, 1]], 2)
    jtj = Gb.reshape(B, -1, n).transpose(1, 2) @ SG.reshape(B, -1, n)
    s = max(int(mean_anchor_stride), 1)
    a = terms.anchors[:, ::s].to(dt)  # (P, A', 2)
    v = terms.points.to(dt)
    k = terms.inv_dist[:, ::s].to(dt) * terms.mean_scale.to(dt)[:, None, None]  # (P, A', pm)
    cmat = torch.stack([(v[:, None, :, j] - a[:, :, j, None]) * k for j in range(2)], 2)  # (P, A', 2, pm)
    gk = G.transpose(1, 2).reshape(P, 2 * pm, n)
    jm = (cmat.reshape(P, a.shape[1], 2 * pm) @ gk).view(B, -1, n)
    jtj = jtj + float(s) * (jm.transpose(1, 2) @ jm)
    return 0.5 * (jtj + jtj.transpose(1, 2))
