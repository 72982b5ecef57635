"""A stand-in for an accelerator, to measure overlap on any machine: an encoder whose
forward pass takes a fixed time per batch and releases the GIL meanwhile, as a kernel
launch does (the host thread is free while the device computes). Used by
``benchmarks/encode_throughput.py --fake-forward-ms`` and its regression test; its
features are zeros and mean nothing."""

from __future__ import annotations

import dataclasses
import time

import torch

from .adapters import LoadedEncoder, load_encoder
from .registry import load_registry

__all__ = ["fake_accelerator"]


def fake_accelerator(ms_per_batch: float, *, name: str = "fake") -> LoadedEncoder:
    """The demo encoder's shape and preprocessing, with a forward that sleeps
    ``ms_per_batch`` milliseconds (whatever the batch size) and returns zeros."""
    demo = load_encoder(load_registry()["demo"], device="cpu")
    dim = demo.entry.embed_dim

    def forward(x: torch.Tensor) -> torch.Tensor:
        time.sleep(ms_per_batch / 1000.0)  # releases the GIL, as waiting on a device does
        return torch.zeros(x.shape[0], dim)

    entry = dataclasses.replace(demo.entry, name=name)
    return dataclasses.replace(demo, entry=entry, image_fn=forward, emulated_device=True)
