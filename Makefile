.PHONY: demo test setup up down status lint backfill
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
backfill: ## make backfill SIZES="tiny tiny_deep" FROM=2026-11-20 TO=2026-11-21 CONF='{"max_steps": 100}'
	scripts/backfill --sizes $(SIZES) --from $(FROM) --to $(TO) --conf '$(or $(CONF),{})'
