PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-lm.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet -r requirements-lm.txt || echo "flashlight-text did \
	not install: CTC word-LM decoding is unavailable; everything else works"
	touch $@

test: venv
	$(BIN)/python -m pytest tests

# DEMO_ARGS: options of demo.py (python demo.py --help), e.g.
#   make demo DEMO_ARGS="--epochs 3"   or   make demo DEMO_ARGS="--resume"
demo: venv
	$(BIN)/python demo.py $(DEMO_ARGS)

# mambapy (requirements-bench.txt): the comparison rows of bench_scan (README)
$(VENV)/.bench-installed: requirements-bench.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt || echo "mambapy did not \
	install: bench_scan skips its mambapy rows; everything else runs"
	touch $@

bench: venv $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.bench_scan --quick
	$(BIN)/python -m benchmarks.bench_models --quick
	$(BIN)/python -m benchmarks.bench_rtf --quick

clean:
	rm -rf $(VENV) results demo_results
