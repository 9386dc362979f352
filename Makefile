.PHONY: demo test setup up down status lint
demo:   ## the main job: stack up, run train_e2e, print the outcome
	scripts/demo
test:   ## the whole test suite (what CI runs)
	scripts/test
setup:
	scripts/setup
up:
	scripts/setup && scripts/stack up
down:
	scripts/stack down
status:
	scripts/stack status
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
