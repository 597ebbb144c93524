# The README's two commands: `make demo` (main job) and `make test` (the test suite).
# Both set up everything they need on a fresh machine (scripts/bootstrap.sh).
.PHONY: demo test lint setup setup-dev

setup:
	./scripts/bootstrap.sh run

setup-dev:
	./scripts/bootstrap.sh dev

demo: setup
	.venv/bin/cycguard demo

test: setup-dev
	.venv/bin/ruff check recon gadgets tests benchmarks
	.venv/bin/lint-imports
	.venv/bin/hadolint docker/Dockerfile docker/Dockerfile.test
	.venv/bin/mypy recon gadgets benchmarks
	.venv/bin/python -m pytest
