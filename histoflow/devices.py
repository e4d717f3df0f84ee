"""Where torch runs: one rule for every stage (features, SSL, MIL, encoders)."""

from __future__ import annotations

from .errors import InputError


def resolve_device(device: str | None, key: str = "device") -> str:
    """``auto`` (or empty) -> ``cuda`` when a GPU is visible, else ``cpu``; an explicit ``cuda``
    without a visible GPU is refused with one line naming the config ``key``."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"config key {key!r}: {device!r} but no CUDA GPU is visible here; "
                         "use 'auto' or 'cpu', or run on a GPU node")
    return device
