"""The benchmark's correctness guard: same work on both paths, or no timing at all."""

import dataclasses

import numpy as np
import pytest
import torch

from bench.compare import (
    SIZES,
    GuardError,
    build_torch_prm,
    check_same_loss,
    guard_losses,
    jax_arrays_from_torch_prm,
    make_batch,
)
from prm_jax.models.config import ModelConfig


def test_check_same_loss_threshold() -> None:
    assert check_same_loss(1.0, 1.0 + 5e-4) < 1e-3
    with pytest.raises(GuardError, match="relative difference"):
        check_same_loss(1.0, 1.01)
    with pytest.raises(GuardError):
        check_same_loss(float("nan"), 1.0)


def test_guard_agrees_on_same_batch_and_fails_on_a_different_one() -> None:
    arch = SIZES["tiny"]
    torch_model = build_torch_prm(arch, seed=0)
    with torch.no_grad():  # non-trivial head and norms so a different batch changes the loss
        for name, p in torch_model.named_parameters():
            if name.startswith("score") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    config = ModelConfig(**arch, with_lm_head=False)
    arrays = jax_arrays_from_torch_prm(torch_model, config)
    batch = make_batch(2, 96, arch["vocab_size"], seed=1, label_every=8, pad_last=12)
    jax_loss, torch_loss = guard_losses(torch_model, config, arrays, batch, batch, torch.device("cpu"))
    assert check_same_loss(jax_loss, torch_loss) <= 1e-5
    other = dataclasses.replace(batch, labels=1.0 - batch.labels)
    jax_loss, torch_loss = guard_losses(torch_model, config, arrays, batch, other, torch.device("cpu"))
    with pytest.raises(GuardError):
        check_same_loss(jax_loss, torch_loss)
    assert np.isfinite([jax_loss, torch_loss]).all()
