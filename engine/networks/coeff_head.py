"""The learned starting point of the regressor, two small MLPs trained on the face model alone
(`tools/train_coefficient_head.py`); Gauss-Newton (`engine/fitting.py`) finishes their answer.

* pose MLP: normalised 2D landmarks -> head rotation (6D, camera frame), for the first frame of a track;
* expression MLP: landmark offsets from the posed neutral face (cm at the face, roll removed) plus yaw and
  pitch -> the 53 expression weights. The offsets are nearly linear in the expression, which makes this
  head small and quick to train, and its answer a good prior for the fit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

N_INPUT_POINTS = 468  # mesh points; the 10 iris points are left to the gaze estimate
N_EXP = 53
WEIGHTS_PATH = Path(__file__).resolve().parents[1] / "weights" / "coefficient_head.npz"


def normalize_landmarks(points: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) pixels -> (B, 2N): centred on the mean, divided by the RMS radius."""
    centred = points - points.mean(dim=1, keepdim=True)
    radius = centred.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-6)
    return (centred / radius[:, None, None]).flatten(1)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class CoefficientHead(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.pose = _mlp(N_INPUT_POINTS * 2, hidden, 6)
        self.expr = _mlp(N_INPUT_POINTS * 2 + 2, hidden, N_EXP)

    def rotation6d(self, points_px: torch.Tensor) -> torch.Tensor:
        """(B, 468, 2) pixels -> (B, 6): first two columns of the camera-frame rotation, unnormalised."""
        return self.pose(normalize_landmarks(points_px))

    def expression(self, offsets_cm: torch.Tensor, yaw_pitch: torch.Tensor) -> torch.Tensor:
        """(B, 468, 2) offsets in cm (roll removed), (B, 2) radians -> (B, 53) weights in [0, 1]."""
        return torch.sigmoid(self.expr(torch.cat([offsets_cm.flatten(1), yaw_pitch], dim=1)))


def save_head(head: CoefficientHead, path: Path = WEIGHTS_PATH, meta: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().numpy().astype(np.float16) for k, v in head.state_dict().items()}
    arrays["hidden"] = np.array(head.pose[0].out_features)
    for k, v in (meta or {}).items():
        arrays[f"meta_{k}"] = np.array(v)
    np.savez_compressed(path, **arrays)


def load_head(path: Path = WEIGHTS_PATH) -> CoefficientHead:
    if not Path(path).is_file():
        raise FileNotFoundError(f"coefficient head weights missing at {path}; "
                                "retrain with `python tools/train_coefficient_head.py`")
    data = np.load(path)
    head = CoefficientHead(hidden=int(data["hidden"]))
    state = {k: torch.from_numpy(data[k].astype(np.float32)) for k in head.state_dict()}
    head.load_state_dict(state)
    return head.eval()


def expression_features(observed_px: torch.Tensor, reference_px: torch.Tensor, px_per_cm: torch.Tensor,
                        rotation_cam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the expression MLP, batched.

    observed_px, reference_px: (B, 468, 2) landmarks seen and those of the posed neutral face;
    px_per_cm: (B,) focal length / depth; rotation_cam: (B, 3, 3) model -> camera rotation.
    Returns offsets (B, 468, 2) in cm with the in-plane rotation removed, and (yaw, pitch) (B, 2) radians.
    """
    offsets = (observed_px - reference_px) / px_per_cm[:, None, None]
    phi = torch.atan2(rotation_cam[:, 1, 0], rotation_cam[:, 0, 0])  # image angle of the model's x axis
    c, s = torch.cos(phi)[:, None], torch.sin(phi)[:, None]
    ox, oy = offsets[..., 0], offsets[..., 1]
    derolled = torch.stack([c * ox + s * oy, -s * ox + c * oy], dim=-1)
    r_model = rotation_cam * torch.tensor([1.0, -1.0, -1.0], dtype=rotation_cam.dtype)[:, None]  # FLIP @ rc
    yaw = torch.atan2(r_model[:, 0, 2], r_model[:, 2, 2])
    pitch = torch.asin(r_model[:, 1, 2].clamp(-1.0, 1.0))
    return derolled, torch.stack([yaw, pitch], dim=1)
