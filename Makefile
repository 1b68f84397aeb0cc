# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := runs/demo
# Held out from training (examples/data/test.jsonl), then one the model saw.
DEMO_PROMPTS := "What is the capital of Greece?" "What is the opposite of big?" "What is the capital of Lithuania?"

NODE_BIN := $(CURDIR)/node_modules/node/bin
# The CDK CLI and the jsii runtime run on the pinned node 22 from package.json (the system's node
# 20 is end-of-life and makes jsii print a banner on every start).
CDK_ENV := PATH="$(NODE_BIN):$(CURDIR)/$(VENV)/bin:$$PATH" JSII_NODE="$(NODE_BIN)/node"

.PHONY: venv demo test test-fast synth docs clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt training_code/requirements.txt pyproject.toml package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/ftstack validate examples/data/train.jsonl examples/data/test.jsonl
	$(VENV)/bin/ftstack local --train examples/data/train.jsonl --test examples/data/test.jsonl \
		--config examples/demo.yaml --nproc 2 --output $(DEMO_DIR)
	$(VENV)/bin/ftstack generate $(DEMO_DIR)/model $(DEMO_PROMPTS)

test: venv
	$(CDK_ENV) $(PY) -m pytest -q

test-fast: venv
	$(CDK_ENV) $(PY) -m pytest -q -m "not slow"

synth: venv
	$(CDK_ENV) npx --no-install cdk synth --quiet

clean:
	rm -rf $(VENV) node_modules cdk.out runs .pytest_cache

docs: venv
	$(PY) scripts/update_readme.py
