# make setup | serve | test | lint | clean.  Extra options: make test PYTEST_ARGS='-k smoke -x',
# make serve SERVE_ARGS='--log-verbose=1' (appended to tritonserver's command line).
PYTHON := .venv/bin/python
PYTEST_ARGS ?=
SERVE_ARGS ?=

.PHONY: setup serve test lint clean

setup:
	bash scripts/setup.sh

serve:
	bash scripts/serve.sh $(SERVE_ARGS)

test: setup
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

# The Dockerfile (hadolint), the deployment shell scripts (shellcheck) and the Kubernetes manifests
# (their JSON schemas, offline); make test runs these too.
lint: setup
	$(PYTHON) -m pytest -q tests/unit/test_docker_lint.py tests/unit/test_kubernetes_manifests.py

clean:
	rm -rf .venv .triton .cache .pytest_cache
