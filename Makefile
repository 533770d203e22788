# The two commands of the README:
#   make digits   train, export and score the built-in digits student (14-32 minutes on 2 idle CPU cores, by machine)
#   make test     the offline test suite
# Both first run `setup`, which installs distill and its dependencies into the current Python.
# Where no torch is installed and there is no NVIDIA GPU, it installs the CPU build first
# (torch==2.13.0, served from the local wheel on our machines), so nothing pulls CUDA builds
# of torch or torchvision; on a GPU machine it installs torch unpinned. TORCH overrides it.

PYTHON ?= python3
RECIPE ?= recipes/digits-dmd2-1step.yaml
RUN ?= runs/digits-dmd2-1step
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export HF_HUB_OFFLINE ?= 1

.PHONY: setup digits test

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	@$(PYTHON) -m pip install -q -e ".[test]"

digits: setup
	$(PYTHON) -m distill train $(RECIPE) output_dir=$(RUN)
	$(PYTHON) -m distill export $(RUN) $(RUN)/export
	$(PYTHON) -m distill sample $(RUN)/export --out $(RUN)/export/samples.png
	$(PYTHON) scripts/bench_quality.py --run $(RUN) --teacher-steps 4,25 --out $(RUN)/bench.md

test: setup
	$(PYTHON) -m pytest -q
