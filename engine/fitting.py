"""Gauss-Newton fit of head pose, expression and (optionally) identity to 2D landmarks.

The model points are linear in the coefficients, L = L0 + Lid @ id + Lexp @ exp, seen through a
pinhole camera after X = Rc L + t. Each iteration linearises the projection analytically (no
autograd), solves damped normal equations with priors, and projects the expression back onto
[0, 1]. Residuals are expressed in centimetres at the face (pixels / (fx / tz)) so that the prior
weights do not depend on image size or distance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.geometry import Camera, rodrigues


@dataclass
class FitWeights:
    """Prior strengths in cm^2 per unit coefficient (see module doc)."""

    exp_l2: float = 0.02  # pulls unused shapes to 0
    exp_l1: float = 0.01  # sparsity: prefer few active shapes to many small compensating ones
    exp_prior: float = 0.05  # toward the learned head's guess
    exp_temporal: float = 0.05  # toward the previous frame
    id_l2: float = 0.5  # identity ~ N(0, 1) scaled
    opposing: float = 1.0  # min(e_a, e_b)^2 on antagonist pairs (jawLeft + jawRight, eyeWide + eyeBlink, ...)
    damping: float = 1e-3


@dataclass
class FitResult:
    rotation_cam: np.ndarray  # (3, 3) model -> camera
    translation: np.ndarray  # (3,) cm, camera frame
    expression: np.ndarray  # (53,)
    identity: np.ndarray  # (n_id_total,)
    rms_cm: float
    rms_px: float
    iterations: int


class LandmarkFitter:
    """Fits one face. Built once per tracker from the face model's landmark bases."""

    def __init__(self, lm_neutral: np.ndarray, lm_id: np.ndarray, lm_exp: np.ndarray,
                 point_index: np.ndarray, point_weight: np.ndarray, fixed_exp: np.ndarray,
                 n_id_fit: int = 40, weights: FitWeights | None = None,
                 opposing_pairs: list[tuple[int, int]] | None = None):
        self.idx = np.asarray(point_index)
        self.L0 = lm_neutral[self.idx].astype(np.float64)
        self.Lid_all = lm_id[:, self.idx].astype(np.float64)  # (100, N, 3)
        self.Lexp = lm_exp[:, self.idx].astype(np.float64)  # (53, N, 3)
        self._id_flat = np.ascontiguousarray(self.Lid_all.reshape(len(self.Lid_all), -1))
        self._exp_flat = np.ascontiguousarray(self.Lexp.reshape(len(self.Lexp), -1))
        self.n_id_fit = n_id_fit
        self.w = np.repeat(np.asarray(point_weight, np.float64), 2)  # per residual
        self.fixed_exp = np.asarray(fixed_exp, bool)  # set from elsewhere (gaze), not fitted
        self.weights = weights or FitWeights()
        # antagonist shapes: a linear model can add both to mimic a shape it lacks; real faces do not
        self.opposing_pairs = list(opposing_pairs or [])
        self._free_basis_cache: dict[bytes, np.ndarray] = {}
        self._id_basis_t = np.ascontiguousarray(self.Lid_all[:n_id_fit].transpose(2, 1, 0))  # (3, N, n_id_fit)

    def _free_basis(self, free_exp: np.ndarray) -> np.ndarray:
        """The free shapes' landmark deltas as (3, N, n_free), cached per free set (a dict: sessions in several
        threads share one fitter, with different free sets -- pose-only fits free none)."""
        key = free_exp.tobytes()
        basis = self._free_basis_cache.get(key)
        if basis is None:
            basis = self._free_basis_cache[key] = np.ascontiguousarray(self.Lexp[free_exp].transpose(2, 1, 0))
        return basis

    @staticmethod
    def _basis_columns(out: np.ndarray, a: np.ndarray, rc: np.ndarray, basis_t: np.ndarray) -> None:
        """out (N, 2, k) = a (N, 2, 3) . (rc @ basis) per point, for a basis given as (3, N, k)."""
        _, n, k = basis_t.shape
        rb = (rc @ basis_t.reshape(3, -1)).reshape(3, n, k)  # one product for all points
        np.multiply(a[:, :, 0, None], rb[0][:, None, :], out=out)
        out += a[:, :, 1, None] * rb[1][:, None, :]
        out += a[:, :, 2, None] * rb[2][:, None, :]

    def model_points(self, identity: np.ndarray, expression: np.ndarray) -> np.ndarray:
        """Landmark model points (..., N, 3); leading dims of identity / expression broadcast."""
        d = identity @ self._id_flat + expression @ self._exp_flat
        return self.L0 + d.reshape(d.shape[:-1] + self.L0.shape)

    def initial_translation(self, obs: np.ndarray, rotation_cam: np.ndarray, points: np.ndarray,
                            camera: Camera) -> np.ndarray:
        """Least-squares t for fixed rotation and shape: (u - c) (Z + tz) = f (X + tx), linear in t."""
        p = points @ rotation_cam.T
        du = (obs[:, 0] - camera.cx) / camera.fx
        dv = (obs[:, 1] - camera.cy) / camera.fy
        n = len(p)
        a = np.zeros((2 * n, 3))
        b = np.zeros(2 * n)
        a[:n, 0], a[:n, 2], b[:n] = 1.0, -du, du * p[:, 2] - p[:, 0]
        a[n:, 1], a[n:, 2], b[n:] = 1.0, -dv, dv * p[:, 2] - p[:, 1]
        t, *_ = np.linalg.lstsq(a, b, rcond=None)
        if t[2] <= 1.0:  # behind or at the camera: fall back to a plausible distance
            t[2] = 50.0
        return t

    def fit(self, obs_px: np.ndarray, camera: Camera, rotation_cam: np.ndarray, translation: np.ndarray,
            expression: np.ndarray, identity: np.ndarray, *, exp_prior: np.ndarray | None = None,
            exp_prev: np.ndarray | None = None, fit_identity: bool = False, pose_only: bool = False,
            iterations: int = 4) -> FitResult:
        obs = np.asarray(obs_px, np.float64)[self.idx]
        rc = rotation_cam.copy()
        t = translation.astype(np.float64).copy()
        e = np.clip(expression.astype(np.float64), 0.0, 1.0)
        beta = identity.astype(np.float64).copy()
        wts = self.weights
        free_exp = np.zeros_like(self.fixed_exp) if pose_only else ~self.fixed_exp
        n_e = int(free_exp.sum())
        n_b = self.n_id_fit if fit_identity and not pose_only else 0
        n_p = 6 + n_e + n_b
        fx, fy = camera.fx, camera.fy
        rms_cm = rms_px = 0.0
        it = 0
        for it in range(1, iterations + 1):
            pts = self.model_points(beta, e)  # (N, 3) model frame
            pc = pts @ rc.T + t  # camera frame
            z = pc[:, 2]
            if np.any(z <= 1e-3):
                break
            proj = np.stack([fx * pc[:, 0] / z + camera.cx, fy * pc[:, 1] / z + camera.cy], axis=1)
            scale = fx / max(t[2], 1e-3)  # px per cm at the face
            r = ((proj - obs) / scale).reshape(-1)  # (2N,) cm
            rms_px = float(np.sqrt(np.mean((proj - obs) ** 2)))
            rms_cm = rms_px / scale
            # d(proj)/d(pc), scaled to cm
            a = np.zeros((len(z), 2, 3))
            a[:, 0, 0] = fx / z
            a[:, 0, 2] = -fx * pc[:, 0] / z**2
            a[:, 1, 1] = fy / z
            a[:, 1, 2] = -fy * pc[:, 1] / z**2
            a /= scale
            rp = pc - t  # rotated points
            jac = np.empty((len(z), 2, n_p))
            # left increment: d(pc)/d(w) = w x rp, so row a . (e_k x rp) = e_k . (rp x a)
            jac[:, :, 0] = rp[:, None, 1] * a[:, :, 2] - rp[:, None, 2] * a[:, :, 1]
            jac[:, :, 1] = rp[:, None, 2] * a[:, :, 0] - rp[:, None, 0] * a[:, :, 2]
            jac[:, :, 2] = rp[:, None, 0] * a[:, :, 1] - rp[:, None, 1] * a[:, :, 0]
            jac[:, :, 3:6] = a
            self._basis_columns(jac[:, :, 6:6 + n_e], a, rc, self._free_basis(free_exp))
            if n_b:
                self._basis_columns(jac[:, :, 6 + n_e:], a, rc, self._id_basis_t[:, :, :n_b])
            jac = jac.reshape(-1, n_p)
            jw = jac * self.w[:, None]
            h = jw.T @ jac
            g = jw.T @ r
            # priors on the expression block
            ef = e[free_exp]
            sl = slice(6, 6 + n_e)
            diag = np.full(n_e, wts.exp_l2)
            g[sl] += wts.exp_l2 * ef + wts.exp_l1
            if exp_prior is not None:
                diag += wts.exp_prior
                g[sl] += wts.exp_prior * (ef - exp_prior[free_exp])
            if exp_prev is not None:
                diag += wts.exp_temporal
                g[sl] += wts.exp_temporal * (ef - exp_prev[free_exp])
            h[sl, sl] += np.diag(diag)
            if self.opposing_pairs and wts.opposing > 0:
                # min(e_a, e_b)^2: only the weaker of two active antagonists is pushed back, so either
                # shape alone is not shrunk
                pos = np.cumsum(free_exp) - 1  # expression index -> position among the free shapes
                for a, b in self.opposing_pairs:
                    if free_exp[a] and free_exp[b]:
                        k = a if e[a] <= e[b] else b
                        i = 6 + pos[k]
                        g[i] += wts.opposing * e[k]
                        h[i, i] += wts.opposing
            if n_b:
                bs = slice(6 + n_e, n_p)
                h[bs, bs] += wts.id_l2 * np.eye(n_b)
                g[bs] += wts.id_l2 * beta[:n_b]
            # bound handling: shapes at a bound whose gradient pushes outward stay fixed this step
            active = np.ones(n_p, bool)
            at_low = (ef <= 0.0) & (g[sl] > 0)
            at_high = (ef >= 1.0) & (g[sl] < 0)
            active[6:6 + n_e] = ~(at_low | at_high)
            ha = h[np.ix_(active, active)]
            ha = ha + wts.damping * np.diag(np.diag(ha) + 1e-6)
            delta = np.zeros(n_p)
            delta[active] = -np.linalg.solve(ha, g[active])
            rc = rodrigues(delta[:3]) @ rc
            t = t + delta[3:6]
            ef = np.clip(ef + delta[sl], 0.0, 1.0)
            e[free_exp] = ef
            if n_b:
                beta[:n_b] += delta[6 + n_e:]
        return FitResult(rc, t, e, beta, rms_cm, rms_px, it)
