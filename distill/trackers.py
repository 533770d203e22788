"""Experiment trackers, through Accelerate's (``train.log_with``): TensorBoard by default,
W&B, Comet, MLflow, Aim and the others Accelerate knows, where installed.

Every tracker gets the same scalars as ``losses.jsonl`` and the config as hyperparameters;
the sample grids go to the trackers that take images (TensorBoard, W&B). TensorBoard and Aim
write in the run's ``logs/``, W&B in its ``wandb/``; MLflow follows ``MLFLOW_TRACKING_URI``
(default ``./mlruns``), and the online services (W&B, Comet) their own settings, e.g.
``WANDB_MODE=offline``.
"""

from __future__ import annotations

from pathlib import Path

from distill.sections import fail

PACKAGES = {"comet_ml": "comet_ml", "aim": "aim", "mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def check_trackers(key: str, names: list[str]) -> None:
    """Each tracker must be one Accelerate knows and installed here."""
    import accelerate.utils as utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            fail(key, f"unknown tracker {name!r}; Accelerate's are {', '.join(LOGGER_TYPE_TO_CLASS)}")
        if not getattr(utils, f"is_{name}_available")():
            fail(key, f"{name!r} is not installed here (pip install {PACKAGES.get(name, name)}), or drop it from {key}")
    if len(set(names)) != len(names):
        fail(key, f"lists a tracker twice: {names}")


def init_kwargs(names: list[str], output_dir: str | Path) -> dict:
    """Where the trackers that take a directory write: inside the run directory."""
    output_dir = Path(output_dir)
    kwargs = {}
    if "wandb" in names:
        (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
        kwargs["wandb"] = {"dir": str(output_dir), "name": output_dir.name}
    return kwargs


def start(accelerator, names: list[str], config: dict, output_dir: str | Path) -> None:
    """``accelerator.init_trackers`` with the recipe ``config`` as hyperparameters; a tracker
    that fails to start (no API key, no network) is a ``train.log_with`` error of one line."""
    try:
        accelerator.init_trackers("distill", config=config, init_kwargs=init_kwargs(names, output_dir))
    except Exception as err:  # each service raises its own kinds: name the key and pass the reason on
        fail("train.log_with", f"the trackers {names} did not start ({type(err).__name__}: {err}); online services "
             "need their login or an offline mode (WANDB_MODE=offline), or drop them from train.log_with")


def log_images(accelerator, key: str, grid, step: int) -> None:
    """A sample grid ``[C, H, W]`` in [0, 1] to every tracker that takes images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.tracker.add_image(key, grid, global_step=step)
        elif tracker.name == "wandb":
            image = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tracker.log_images({key: [image[..., 0] if image.shape[2] == 1 else image]}, step=step)
