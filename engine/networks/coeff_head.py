"""The learned starting point of the regressor: normalised 2D landmarks -> expression + rotation.

A small MLP trained on synthetic landmark sets made from the face model itself
(`tools/train_coefficient_head.py`); Gauss-Newton (`engine/fitting.py`) finishes its answer.
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
    """(B, N, 2) pixels -> (B, 2N): centred on the mean, divided by the RMS radius.

    Translation and scale of the face in the image carry no expression information, so they are
    removed; rotation is kept because the head predicts it.
    """
    centred = points - points.mean(dim=1, keepdim=True)
    radius = centred.pow(2).sum(-1).mean(-1).sqrt().clamp_min(1e-6)
    return (centred / radius[:, None, None]).flatten(1)


class CoefficientHead(nn.Module):
    def __init__(self, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(N_INPUT_POINTS * 2, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, N_EXP + 6),
        )

    def forward(self, points_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 468, 2) pixels -> expression (B, 53) in [0, 1], rotation 6D (B, 6) (camera frame)."""
        out = self.net(normalize_landmarks(points_px))
        return torch.sigmoid(out[:, :N_EXP]), out[:, N_EXP:]


def save_head(head: CoefficientHead, path: Path = WEIGHTS_PATH, meta: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().numpy().astype(np.float16) for k, v in head.state_dict().items()}
    arrays["hidden"] = np.array(head.net[0].out_features)
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
