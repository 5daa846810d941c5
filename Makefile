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

demo: venv
	$(BIN)/python demo.py $(DEMO_ARGS)

bench: venv
	$(BIN)/python -m benchmarks.bench_scan --quick
	$(BIN)/python -m benchmarks.bench_models --quick
	$(BIN)/python -m benchmarks.bench_rtf --quick

clean:
	rm -rf $(VENV) results demo_results
