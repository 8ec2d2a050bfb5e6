"""Plain PyTorch execution (eager, inference mode)."""
from __future__ import annotations

import os

import torch
from torch import nn


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "cpu", threads: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # Small convolutions run best on as many threads as there are cores, no more.
            torch.set_num_threads(threads or min(4, os.cpu_count() or 1))

    def prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.device).eval()

    def tensor(self, array) -> torch.Tensor:
        return torch.as_tensor(array, device=self.device)

    def run(self, module: nn.Module, *inputs: torch.Tensor):
        with torch.inference_mode():
            return module(*inputs)

    def describe(self) -> str:
        return f"{self.name}:{self.device.type}"
