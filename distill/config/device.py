"""What a recipe asks of the machine it is launched on, checked before any weights load by
``distill train`` / ``python -m distill.train`` and by ``distill validate`` (which says whether
the recipe would train here), not by ``config.load``, which also reads back runs made elsewhere.

A mixed-precision mode the device cannot run is an error, not a warning: Accelerate would
train in float32 and say nothing (the losses equal fp32's), so a user who asked for fp16's
memory and speed would get neither without knowing; one override (``train.mixed_precision=no``
or ``bf16``) is the whole fix.
"""

from __future__ import annotations

from distill.errors import ConfigError

# mixed-precision modes that cannot take effect on a device type: why, and what works instead
UNSUPPORTED = {("fp16", "cpu"): "float16 autocast needs a GPU; on a CPU Accelerate would train in float32 and say "
                                "nothing. Use train.mixed_precision=bf16 (CPU autocast) or no"}


def launch_device():
    """The device Accelerate trains on when launched from here."""
    from accelerate import PartialState

    return PartialState().device


def check_device(config, source: str, device=None) -> None:
    """The recipe's mixed precision must take effect on ``device`` (default: Accelerate's)."""
    device = launch_device() if device is None else device
    why = UNSUPPORTED.get((config.train.mixed_precision, device.type))
    if why is not None:
        raise ConfigError(f"{source}: train.mixed_precision: {config.train.mixed_precision} cannot take effect on this "
                          f"machine ({device.type}): {why}")
