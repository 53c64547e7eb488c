"""The seed's own PyTorch model and training loop.

Imports only torch and NumPy (no JAX), so a process timing PyTorch pays for nothing else;
``jaxnet.seed.train_torch`` starts it from jaxnet's initial weights.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn


class TorchSimpleNet(nn.Module):
    """The seed's PyTorch model: fc1 Linear(10, 5), ReLU, fc2 Linear(5, 1)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 1)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def seed_loop(model: nn.Module, x: np.ndarray, y: np.ndarray, *, learning_rate: float, epochs: int,
              log_every: int | None = None):
    """The seed's loop: full-batch MSE and SGD on ``x: [n, 10]``, ``y: [n, 1]`` float32.

    Returns ``(losses, wall_s)``: the loss of every epoch (before that epoch's update, as the
    seed prints it) and the loop's wall time (optimiser creation excluded). Losses are kept as
    tensors and read once at the end so that recording them costs the loop nothing the seed's
    loop does not pay.
    """
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    history = []
    start = time.perf_counter()
    for epoch in range(epochs):
        optimizer.zero_grad()
        loss = criterion(model(xt), yt)
        loss.backward()
        optimizer.step()
        history.append(loss.detach())
        if log_every and (epoch + 1) % log_every == 0:
            print(f"torch epoch {epoch + 1}  loss {loss.item():.6g}")
    wall = time.perf_counter() - start
    return np.array([h.item() for h in history], np.float64), wall
