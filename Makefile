# Each target sets up its own virtual environment (once; later runs reuse it).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SHARED := $(abspath ../shared)
# Real data and weights, when this checkout sits beside a shared/ folder holding them.
DEMO_DATA ?= $(or $(CLINADAPT_DATA),$(wildcard $(SHARED)/data/medmnist))
DEMO_WEIGHTS ?= $(or $(CLINADAPT_WEIGHTS),$(wildcard $(SHARED)/weights))

# MedMNIST-C corruptions: medmnistc pins medmnist==3.0.1 and scikit-image==0.23.2, which its
# corruptions do not need, so it is installed without its dependencies (clinadapt[shift] has them).
MEDMNISTC ?= medmnistc==0.1.0

.PHONY: setup system-deps demo test format benchmarks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MEDMNISTC)
	@$(MAKE) --no-print-directory system-deps
	rm -f $(VENV)/.installed-*
	touch $@

# ImageMagick's MagickWand library (for Wand, MedMNIST-C's motion blur): installed with apt-get
# when running as root, else named; the MedMNIST-C tests are skipped without it.
system-deps:
	@ldconfig -p 2>/dev/null | grep -q libMagickWand || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends imagemagick; } \
	      || echo "could not install ImageMagick: MedMNIST-C shifts (and their tests) are unavailable"; \
	  else \
	    echo "MedMNIST-C shifts need ImageMagick: apt-get install imagemagick (macOS: brew install imagemagick)"; \
	  fi; }

demo: $(STAMP)
	CLINADAPT_DATA=$(DEMO_DATA) CLINADAPT_WEIGHTS=$(DEMO_WEIGHTS) $(VENV)/bin/clinadapt quickstart

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/pytest

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts
	$(VENV)/bin/ruff format src tests benchmarks scripts

benchmarks: $(STAMP)
	CLINADAPT_DATA=$(DEMO_DATA) CLINADAPT_WEIGHTS=$(DEMO_WEIGHTS) $(PY) benchmarks/bench_cache.py
	CLINADAPT_DATA=$(DEMO_DATA) CLINADAPT_WEIGHTS=$(DEMO_WEIGHTS) $(PY) benchmarks/bench_volumes.py
	$(PY) benchmarks/bench_bf16.py
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
