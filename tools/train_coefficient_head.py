"""Train the regressor's coefficient head from the face model alone (no images, no downloads).

    python tools/train_coefficient_head.py            # writes engine/weights/coefficient_head.npz

Synthetic samples: random identity, expression and head pose; the 468 MediaPipe-corresponding mesh
points are projected through a random pinhole camera and jittered with landmark-like noise. The
expression MLP sees them relative to the posed neutral face, with the pose and identity perturbed the way
a rigid fit and an early identity estimate err. Fixed seeds: the same command gives the same weights on
the same software.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.face_model import FaceModel  # noqa: E402
from engine.networks.coeff_head import (N_EXP, N_INPUT_POINTS, CoefficientHead, expression_features,  # noqa: E402
                                        save_head)

MIRROR_PAIRS_SUFFIX = ("_L", "_R")
EXCLUSIVE = [("jawLeft", "jawRight"), ("mouthLeft", "mouthRight")]


class SampleMaker:
    def __init__(self, model: FaceModel, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        names = list(model.exp_names)
        self.names = names
        self.l0 = torch.from_numpy(model.lm_neutral[:N_INPUT_POINTS].astype(np.float32))
        self.lid = torch.from_numpy(model.lm_id[:40, :N_INPUT_POINTS].astype(np.float32))
        self.lexp = torch.from_numpy(model.lm_exp[:, :N_INPUT_POINTS].astype(np.float32))
        self.pairs = [(i, names.index(n[:-2] + "_R")) for i, n in enumerate(names)
                      if n.endswith("_L") and n[:-2] + "_R" in names]
        self.exclusive = [(names.index(a), names.index(b)) for a, b in EXCLUSIVE]
        self.blink = (names.index("eyeBlink_L"), names.index("eyeBlink_R"))
        self.jaw, self.close = names.index("jawOpen"), names.index("mouthClose")

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g)

    def expressions(self, b: int) -> torch.Tensor:
        active = self.rand(b, N_EXP) < 0.10
        e = self.rand(b, N_EXP).pow(0.7) * active
        # symmetric faces are common: copy left to right for half of the samples
        sym = self.rand(b) < 0.5
        for li, ri in self.pairs:
            e[sym, ri] = (e[sym, li] + 0.1 * (self.rand(int(sym.sum())) - 0.5)).clamp(0, 1)
        for a, c in self.exclusive:
            drop = self.rand(b) < 0.5
            e[drop, a] = 0
            e[~drop, c] = 0
        blink = self.rand(b)
        both = blink < 0.2
        v = self.rand(b)
        e[both, self.blink[0]] = v[both]
        e[both, self.blink[1]] = (v[both] + 0.1 * (self.rand(int(both.sum())) - 0.5)).clamp(0, 1)
        one = (blink >= 0.2) & (blink < 0.3)
        side = self.rand(b) < 0.5
        e[one & side, self.blink[0]] = self.rand(int((one & side).sum()))
        e[one & ~side, self.blink[1]] = self.rand(int((one & ~side).sum()))
        jaw = self.rand(b) < 0.3
        e[jaw, self.jaw] = self.rand(int(jaw.sum()))
        e[:, self.close] = torch.minimum(e[:, self.close], e[:, self.jaw])
        return e

    def rotations(self, b: int, max_deg=(55.0, 35.0, 35.0)) -> torch.Tensor:
        yaw = (self.rand(b) * 2 - 1) * math.radians(max_deg[0])
        pitch = (self.rand(b) * 2 - 1) * math.radians(max_deg[1])
        roll = (self.rand(b) * 2 - 1) * math.radians(max_deg[2])
        cy, sy, cp, sp, cr, sr = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin(), roll.cos(), roll.sin()
        o, z = torch.ones(b), torch.zeros(b)
        ry = torch.stack([cy, z, sy, z, o, z, -sy, z, cy], 1).view(b, 3, 3)
        rx = torch.stack([o, z, z, z, cp, sp, z, -sp, cp], 1).view(b, 3, 3)  # Rx(-pitch)
        rz = torch.stack([cr, sr, z, -sr, cr, z, z, z, o], 1).view(b, 3, 3)  # Rz(-roll)
        flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
        return flip @ ry @ rx @ rz  # camera rotation

    def shape(self, ident, e):
        return self.l0 + torch.einsum("bk,knd->bnd", ident, self.lid) + torch.einsum("bk,knd->bnd", e, self.lexp)

    @staticmethod
    def project(pts, rc, t, f):
        pc = torch.einsum("bij,bnj->bni", rc, pts) + t[:, None]
        return pc[..., :2] / pc[..., 2:3] * f[:, None, None]

    def batch(self, b: int):
        """-> observed landmarks (px), expression MLP inputs, true expression, true rotation 6D."""
        ident = torch.randn(b, 40, generator=self.g) * 0.8
        e = self.expressions(b)
        rc = self.rotations(b)
        dist = 30 + 90 * self.rand(b)
        t = torch.stack([(self.rand(b) - 0.5) * 0.4 * dist, (self.rand(b) - 0.5) * 0.3 * dist, dist], 1)
        f = 320 / torch.tan(torch.deg2rad(40 + 40 * self.rand(b)) / 2)
        uv = self.project(self.shape(ident, e), rc, t, f)
        size = (uv - uv.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt()
        noise = torch.randn(uv.shape, generator=self.g) * (0.004 + 0.01 * self.rand(b))[:, None, None]
        uv = uv + noise * size[:, None, None]
        # the reference the expression MLP compares against: an imperfect pose and identity estimate
        flip = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
        rc_est = rc @ (flip @ self.rotations(b, (1.5, 1.5, 1.0)))  # a small model-frame error
        t_est = t + torch.randn(b, 3, generator=self.g) * torch.tensor([0.2, 0.2, 1.0])
        ident_est = ident + torch.randn(b, 40, generator=self.g) * 0.2
        ref = self.project(self.shape(ident_est, torch.zeros_like(e)), rc_est, t_est, f)
        offsets, yaw_pitch = expression_features(uv, ref, f / t_est[:, 2], rc_est)
        target_rot6 = torch.cat([rc[:, :, 0], rc[:, :, 1]], 1)
        return uv, (offsets, yaw_pitch), e, target_rot6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    model = FaceModel.load()
    maker = SampleMaker(model, args.seed)
    head = CoefficientHead(hidden=args.hidden)
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        uv, feats, e, r6 = maker.batch(args.batch)
        rot6 = head.rotation6d(uv)
        rot = torch.cat([torch.nn.functional.normalize(rot6[:, :3], dim=1),
                         torch.nn.functional.normalize(rot6[:, 3:], dim=1)], 1)
        exp = head.expression(*feats)
        loss = 10.0 * (exp - e).pow(2).mean() + (rot - r6).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == 1:
            print(f"step {step:6d}  loss {loss.item():.4f}  ({time.time() - t0:.0f} s)", flush=True)
    head.eval()
    # held-out figures
    val = SampleMaker(model, args.seed + 1)
    uv, feats, e, r6 = val.batch(4000)
    with torch.no_grad():
        exp, rot6 = head.expression(*feats), head.rotation6d(uv)
    mae = (exp - e).abs().mean().item()
    base = e.abs().mean().item()
    r1 = torch.nn.functional.normalize(rot6[:, :3], dim=1)
    ang = torch.rad2deg(torch.acos((r1 * r6[:, :3]).sum(1).clamp(-1, 1))).mean().item()
    print(f"held-out: expression MAE {mae:.4f} (all-zero guess: {base:.4f}), first-axis angle error {ang:.2f} deg")
    save_head(head, **({"path": args.out} if args.out else {}),
              meta={"steps": args.steps, "seed": args.seed, "val_exp_mae": mae, "val_axis_err_deg": ang})
    print("saved", args.out or "engine/weights/coefficient_head.npz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
