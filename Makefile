# The two commands of the README, and the pieces they are made of.
.PHONY: demo test install unit lint local-up local-down

demo:            ## install, then run the example pipeline end to end on the local stack
	bash scripts/demo.sh

test:            ## install, then run the whole suite (unit, integration, end to end)
	bash scripts/test.sh

install:
	bash scripts/install.sh

unit:
	.venv/bin/pytest -q tests/unit

lint:
	.venv/bin/ruff check .

local-up:
	.venv/bin/python -m batchvm_local up

local-down:
	.venv/bin/python -m batchvm_local down

.PHONY: airflow
airflow:         ## install, then run Airflow with its UI on the local stack until Ctrl-C (prints URL and login)
	bash scripts/airflow.sh

.PHONY: bench
bench:           ## the benchmark against the stock google-provider chain (< 15 min; QUICK=1 for the < 3 min run)
	.venv/bin/python -m bench $(if $(QUICK),--quick,)

.PHONY: bench-shards
bench-shards:    ## issue 6: one job sharded over 4 VMs against 4 single jobs in a row (REPEAT=3, ~5 min)
	.venv/bin/python -m bench.shards --repeat $(or $(REPEAT),3)
