"""`LandmarkFitter.fit` for many tracked faces at once, in torch on any device (a GPU for many streams).

The per-face NumPy fit holds the GIL and costs a CPU core per few streams; on a GPU machine serving dozens of
streams it is the stage that does not batch. This is the same Gauss-Newton step -- pose (left-multiplied
rotation increment, translation) and the free expressions, identity held, the same priors, antagonist-pair
penalty, bound handling and damping -- written once for a batch: faces differ in camera, pose, shape and which
shapes sit at a bound, so the bound handling masks each face's normal equations instead of slicing them.
float64 throughout, so a batch gives each face the NumPy fit's answer (1e-13 on this CPU for the same inputs).

Only the tracking case is batched (previous frame known, identity held); new tracks and the identity phase
keep the per-face fit (`Regressor.regress`).
"""
from __future__ import annotations

import numpy as np
import torch

from engine.cuda_graphs import GraphCache
from engine.fitting import FitResult, LandmarkFitter
from engine.geometry import Camera


def batched_rodrigues(w: torch.Tensor) -> torch.Tensor:
    """(B, 3) axis-angle -> (B, 3, 3); the first-order form below 1e-12 rad, as `engine.geometry.rodrigues`."""
    theta = torch.linalg.vector_norm(w, dim=1)
    small = theta < 1e-12
    k = w / torch.where(small, torch.ones_like(theta), theta)[:, None]
    K = _skew(k)
    s, c = torch.sin(theta)[:, None, None], torch.cos(theta)[:, None, None]
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(K)
    full = eye + s * K + (1.0 - c) * (K @ K)
    return torch.where(small[:, None, None], eye + _skew(w), full)


def _skew(v: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(v[:, 0])
    return torch.stack([torch.stack([z, -v[:, 2], v[:, 1]], 1), torch.stack([v[:, 2], z, -v[:, 0]], 1),
                        torch.stack([-v[:, 1], v[:, 0], z], 1)], 1)


class BatchedLandmarkFitter:
    """A `LandmarkFitter`'s bases and weights on a torch device, fitting a batch of tracked faces."""

    def __init__(self, fitter: LandmarkFitter, device: torch.device | str = "cpu"):
        self.fitter = fitter
        self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        free = ~np.asarray(fitter.fixed_exp, bool)
        self.free = torch.as_tensor(free, device=self.device)
        self.free_idx = torch.as_tensor(np.nonzero(free)[0], device=self.device)
        self.L0 = torch.as_tensor(fitter.L0, **f64)  # (N, 3)
        self.id_flat = torch.as_tensor(fitter._id_flat, **f64)  # (n_id, N*3)
        self.exp_flat = torch.as_tensor(fitter._exp_flat, **f64)  # (n_exp, N*3)
        self.basis = torch.as_tensor(np.ascontiguousarray(fitter.Lexp[free].transpose(2, 1, 0)), **f64)  # (3, N, k)
        self.w = torch.as_tensor(fitter.w, **f64)  # per residual (2N,)
        pos = np.cumsum(free) - 1  # expression index -> position among the free shapes
        pairs = [(a, b) for a, b in fitter.opposing_pairs if free[a] and free[b]]
        self.pair_a = torch.as_tensor([a for a, _ in pairs], dtype=torch.long, device=self.device)
        self.pair_b = torch.as_tensor([b for _, b in pairs], dtype=torch.long, device=self.device)
        self.pos = torch.as_tensor(pos, dtype=torch.long, device=self.device)
        self.graphs = GraphCache(self.device)  # on CUDA: one captured graph per bucket size and iteration count

    def fit(self, obs_px: np.ndarray, cameras: list[Camera], rotation_cam: np.ndarray, translation: np.ndarray,
            expression: np.ndarray, identity: np.ndarray, exp_prior: np.ndarray, exp_prev: np.ndarray,
            iterations: int = 3) -> list[FitResult]:
        """obs_px (B, >=N, 2) pixels, cameras (B,), rotation_cam (B, 3, 3), translation (B, 3), expression /
        exp_prior / exp_prev (B, n_exp), identity (B, n_id): per-face `LandmarkFitter.fit(...,
        exp_prior=, exp_prev=)` results."""
        B = len(cameras)
        n_id = self.id_flat.shape[0]
        host = [np.asarray(obs_px, np.float64)[:, self.fitter.idx],
                np.array([[c.fx, c.fy, c.cx, c.cy] for c in cameras], np.float64),
                np.asarray(rotation_cam, np.float64), np.asarray(translation, np.float64),
                np.asarray(expression, np.float64), np.asarray(identity, np.float64)[:, :n_id],
                np.asarray(exp_prior, np.float64), np.asarray(exp_prev, np.float64)]
        out = self.graphs.run(lambda *t: self._solve(*t, iterations=iterations), host, key=iterations)
        out = out.cpu().numpy()  # one transfer: (B, 9 + 3 + n_exp + 3)
        n_e = host[4].shape[1]
        rc, t, e = out[:, :9].reshape(B, 3, 3), out[:, 9:12], out[:, 12:12 + n_e]
        rms_px, rms_cm, its = out[:, 12 + n_e], out[:, 13 + n_e], out[:, 14 + n_e]
        idn = np.asarray(identity, np.float64)
        return [FitResult(rc[i], t[i], e[i], idn[i].copy(), float(rms_cm[i]), float(rms_px[i]), int(its[i]))
                for i in range(B)]

    # CUDA graphs (`engine.cuda_graphs`): the fit is ~300 small kernels, so a batch's time on a GPU is launch
    # overhead; one captured graph per padded batch size replays them in one launch.

    def _solve(self, obs, cam, rc, t, e, ident, prior, prev, *, iterations: int) -> torch.Tensor:
        """The batched Gauss-Newton iterations on device tensors, free of host synchronisation (so that it can
        be captured in a CUDA graph). Returns (B, 9 + 3 + n_exp + 3): rotation, translation, expression,
        rms px, rms cm, iterations."""
        dev, wts = self.device, self.fitter.weights
        e = e.clamp(0.0, 1.0)
        B, N = obs.shape[0], obs.shape[1]
        fi = self.free_idx
        n_e = int(fi.numel())
        n_p = 6 + n_e
        base = self.L0 + (ident @ self.id_flat).view(B, N, 3)  # identity held
        eye = torch.eye(n_p, dtype=torch.float64, device=dev)
        fx, fy = cam[:, 0, None], cam[:, 1, None]
        ok = torch.ones(B, dtype=torch.bool, device=dev)  # faces still stepping (a point behind the camera stops one)
        rms_px = torch.zeros(B, dtype=torch.float64, device=dev)
        rms_cm = torch.zeros(B, dtype=torch.float64, device=dev)
        its = torch.zeros(B, dtype=torch.float64, device=dev)
        for _ in range(iterations):
            its = its + ok.double()  # as the per-face fit counts: the iteration that finds a point behind counts
            pts = base + (e @ self.exp_flat).view(B, N, 3)
            pc = pts @ rc.transpose(1, 2) + t[:, None, :]
            z = pc[..., 2]
            ok = ok & (z > 1e-3).all(1)
            zs = torch.where(ok[:, None], z, torch.ones_like(z))
            proj = torch.stack([fx * pc[..., 0] / zs + cam[:, 2, None], fy * pc[..., 1] / zs + cam[:, 3, None]], -1)
            scale = fx[:, 0] / t[:, 2].clamp_min(1e-3)  # px per cm at the face
            rms = ((proj - obs) ** 2).mean((1, 2)).sqrt()
            rms_px = torch.where(ok, rms, rms_px)
            rms_cm = torch.where(ok, rms / scale, rms_cm)
            r = ((proj - obs) / scale[:, None, None]).reshape(B, 2 * N)
            a = torch.zeros(B, N, 2, 3, dtype=torch.float64, device=dev)  # d(proj)/d(pc) in cm
            a[:, :, 0, 0] = fx / zs
            a[:, :, 0, 2] = -fx * pc[..., 0] / zs**2
            a[:, :, 1, 1] = fy / zs
            a[:, :, 1, 2] = -fy * pc[..., 1] / zs**2
            a = a / scale[:, None, None, None]
            rp = pc - t[:, None, :]
            jac = torch.empty(B, N, 2, n_p, dtype=torch.float64, device=dev)
            jac[..., 0] = rp[:, :, None, 1] * a[..., 2] - rp[:, :, None, 2] * a[..., 1]  # e_k . (rp x a)
            jac[..., 1] = rp[:, :, None, 2] * a[..., 0] - rp[:, :, None, 0] * a[..., 2]
            jac[..., 2] = rp[:, :, None, 0] * a[..., 1] - rp[:, :, None, 1] * a[..., 0]
            jac[..., 3:6] = a
            rb = (rc @ self.basis.reshape(3, -1)).view(B, 3, N, n_e)  # rotated expression deltas
            jac[..., 6:] = (a[..., 0, None] * rb[:, 0, :, None] + a[..., 1, None] * rb[:, 1, :, None]
                            + a[..., 2, None] * rb[:, 2, :, None])
            jac = jac.reshape(B, 2 * N, n_p)
            jw = jac * self.w[None, :, None]
            h = jw.transpose(1, 2) @ jac
            g = (jw.transpose(1, 2) @ r[..., None])[..., 0]
            ef = e[:, fi]
            g[:, 6:] += wts.exp_l2 * ef + wts.exp_l1 + wts.exp_prior * (ef - prior[:, fi]) \
                + wts.exp_temporal * (ef - prev[:, fi])
            diag = torch.zeros(B, n_p, dtype=torch.float64, device=dev)
            diag[:, 6:] = wts.exp_l2 + wts.exp_prior + wts.exp_temporal
            if self.pair_a.numel() and wts.opposing > 0:
                # min(e_a, e_b)^2: only the weaker of two active antagonists is pushed back
                k = torch.where(e[:, self.pair_a] <= e[:, self.pair_b], self.pair_a, self.pair_b)  # (B, pairs)
                col = 6 + self.pos[k]
                g.scatter_add_(1, col, wts.opposing * torch.gather(e, 1, k))
                diag.scatter_add_(1, col, torch.full_like(col, wts.opposing, dtype=torch.float64))
            h = h + torch.diag_embed(diag)
            # bound handling: shapes at a bound whose gradient pushes outward stay fixed this step
            act = torch.ones(B, n_p, dtype=torch.bool, device=dev)
            act[:, 6:] = ~(((ef <= 0.0) & (g[:, 6:] > 0)) | ((ef >= 1.0) & (g[:, 6:] < 0)))
            actf = act.double()
            ha = h * actf[:, :, None] * actf[:, None, :]
            hd = torch.diagonal(ha, dim1=1, dim2=2)
            ha = ha + eye * (wts.damping * (hd + 1e-6) * actf + (1.0 - actf))[:, None, :]
            # solve_ex without its error check: the check is a device-to-host copy (a damped, positive
            # diagonal keeps the system regular)
            delta = -torch.linalg.solve_ex(ha, (g * actf)[..., None], check_errors=False)[0][..., 0]
            delta = delta * ok[:, None]
            rc = batched_rodrigues(delta[:, :3]) @ rc
            t = t + delta[:, 3:6]
            e = e.index_copy(1, fi, (ef + delta[:, 6:]).clamp(0.0, 1.0))
        return torch.cat([rc.reshape(B, 9), t, e, rms_px[:, None], rms_cm[:, None], its[:, None]], 1)
