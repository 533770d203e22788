"""Training entry point, for ``accelerate launch`` and for ``distill train``.

    accelerate launch -m distill.train recipes/digits-dmd2-1step.yaml train.max_steps=20
    accelerate launch --num_processes 2 --cpu -m distill.train recipes/digits-dmd2-1step.yaml

Arguments after the recipe are ``section.key=value`` overrides of any field.
"""

from __future__ import annotations

import sys

from distill import config as config_lib
from distill.config.checks import keyed_errors
from distill.config.device import check_device
from distill.errors import user_errors
from distill.runs import check_new_run


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    config = config_lib.load(argv[0], argv[1:])  # every recipe error surfaces here, before any weights load
    check_new_run(config, argv[0])
    check_device(config, argv[0])
    from distill.trainer import DistillTrainer

    trainer = DistillTrainer(config)
    with keyed_errors(argv[0]):  # a setting that fails only as it takes effect (a tracker's login), named with the file
        trainer.setup()
    return trainer.train()


if __name__ == "__main__":
    try:
        main()
    except user_errors() as err:
        sys.exit(f"distill: {err}")
