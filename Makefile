.PHONY: demo test setup up up-celery down status lint backfill mwaa-package mwaa-deploy
demo:   ## the main job: stack up, run train_e2e, print the outcome
	scripts/demo
test:   ## the whole test suite (what CI runs)
	scripts/test
setup:
	scripts/setup
up:
	scripts/setup && scripts/stack up
up-celery: ## the local stack with CeleryExecutor (Redis, a worker per queue); `make down` first if it runs
	scripts/setup && scripts/stack up --executor celery
down:
	scripts/stack down
status:
	scripts/stack status
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
backfill: ## make backfill SIZES="tiny tiny_deep" FROM=2026-11-20 TO=2026-11-21 CONF='{"max_steps": 100}'
	scripts/backfill --sizes $(SIZES) --from $(FROM) --to $(TO) --conf '$(or $(CONF),{})'
mwaa-package: ## build the Amazon MWAA layout in build/mwaa (dags/, plugins.zip, requirements.txt, startup.sh)
	PYTHONPATH=plugins .venv/bin/python -m dtp.deploy.mwaa package
mwaa-deploy: ## make mwaa-deploy NAME=dtp BUCKET=... ROLE_ARN=... SUBNETS="subnet-a subnet-b" SG=sg-...
	PYTHONPATH=plugins .venv/bin/python -m dtp.deploy.mwaa deploy --name $(NAME) --bucket $(BUCKET) \
	  --role-arn $(ROLE_ARN) --subnets $(SUBNETS) --security-group $(SG)
