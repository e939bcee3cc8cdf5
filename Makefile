# make setup | serve | test | clean.  Extra options: make test PYTEST_ARGS='-k smoke -x',
# make serve SERVE_ARGS='--log-verbose=1' (appended to tritonserver's command line).
PYTHON := .venv/bin/python
PYTEST_ARGS ?=
SERVE_ARGS ?=

.PHONY: setup serve test clean

setup:
	bash scripts/setup.sh

serve:
	bash scripts/serve.sh $(SERVE_ARGS)

test: setup
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

clean:
	rm -rf .venv .triton .cache .pytest_cache
