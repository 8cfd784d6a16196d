# One-command entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
# make screenshots serves the store on its own port, so a running `make mlflow-ui` is left alone
SCREENSHOT_PORT ?= 5099

.PHONY: help setup repro plan test test-fast lint plots screenshots results-table mlflow-ui mlflow-server lock clean-venv verify-repro verify-failure bench-finetune generate generate-all chat serve bench-infer bench-autoround bench-gptq bench-serve bench-scale fuzz report sweep sweep-offline

# make generate / chat / serve / bench-infer: which GGUF (models/gguf/finetuned-$(QUANT).gguf; QUANT=reference is the unquantized reference)
QUANT ?= q4_0
N ?= 128
PROMPT ?= Building a website can be done in 10 simple steps:
RAW ?=
PORT ?= 8000
export PROMPT
GGUF = models/gguf/finetuned-$(QUANT).gguf

HELP_VARS := QUANT PORT MLFLOW_PORT
help: ## List every target with one line each
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}' \
	  | sed $(foreach v,$(HELP_VARS),-e 's/\$$($(v))/$($(v))/g')

setup: $(STAMP) ## Create .venv (Python 3.11) with the pinned dependencies and a probed llama.cpp build (LLAMA_CMAKE_ARGS=auto|safe|"-D…" overrides)

# LLAMA_CMAKE_ARGS given on the command line is remembered, so changing it rebuilds llama.cpp and nothing else.
LLAMA_ARGS_FILE := $(VENV)/.llama-cmake-args
ifneq ($(strip $(LLAMA_CMAKE_ARGS)),)
$(LLAMA_ARGS_FILE): FORCE
	@mkdir -p $(VENV); printf '%s\n' '$(LLAMA_CMAKE_ARGS)' | cmp -s - $@ || printf '%s\n' '$(LLAMA_CMAKE_ARGS)' > $@
else
$(LLAMA_ARGS_FILE):
	@mkdir -p $(VENV); echo auto > $@
endif
.PHONY: FORCE
FORCE:

# One line per step on the terminal; pip's own output goes to .venv/setup.log (its tail is printed on failure).
SETUP_LOG := $(VENV)/setup.log
step = @echo "setup: $(1)"; { $(2); } >>$(SETUP_LOG) 2>&1 || { tail -n 20 $(SETUP_LOG); echo "error: setup step failed: $(1) (whole log: $(SETUP_LOG))"; exit 1; }

$(VENV)/.deps: requirements.lock pyproject.toml
	@command -v $(PYTHON_SYS) >/dev/null || { echo "error: $(PYTHON_SYS) not found (Python 3.11 is required)"; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON_SYS) -m venv $(VENV)
	@: > $(SETUP_LOG)
	$(call step,pip,$(VENV)/bin/python -m pip install --quiet --upgrade pip)
	@# torch first and alone, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
	$(call step,torch (CPU wheel),$(VENV)/bin/python -m pip install --quiet $$(grep -E '^torch==' requirements.lock))
	@# The lock is a full freeze, so --no-deps; llama-cpp-python is left to tools/llama_build.py (flags + probe).
	@grep -viE '^llama[-_]cpp[-_]python==' requirements.lock > $(VENV)/requirements-no-llama.txt
	$(call step,the pinned dependencies (requirements.lock),$(VENV)/bin/python -m pip install --quiet --no-deps -r $(VENV)/requirements-no-llama.txt)
	@# The shared library (src/alpaca_lora_cpu), editable: stages and tools import it from any folder.
	$(call step,the library (src/alpaca_lora_cpu; editable),$(VENV)/bin/python -m pip install --quiet --no-deps -e .)
	@touch $@

$(VENV)/.llama: $(VENV)/.deps $(LLAMA_ARGS_FILE) tools/llama_build.py
	@echo "setup: llama.cpp (tools/llama_build.py: flags from this CPU, a probe in a child process)"
	@$(VENV)/bin/python -m tools.llama_build --cmake-args "$$(cat $(LLAMA_ARGS_FILE))"
	@touch $@

# The offline `dvc plots` template (.dvc/config points at it): vega, vega-lite and vega-embed from vl-convert-python.
PLOTS_TEMPLATE := $(VENV)/dvc-plots.html
$(PLOTS_TEMPLATE): $(VENV)/.deps tools/plots_template.py
	$(call step,the offline dvc plots template,$(VENV)/bin/python -m tools.plots_template --out $@)

$(STAMP): $(VENV)/.deps $(VENV)/.llama $(PLOTS_TEMPLATE)
	@touch $@

repro: $(STAMP) ## Run the pipeline (dvc repro) on the embedded defaults, printing its cost plan once the data is prepared
	@export PIPELINE_RUN_ID=$${PIPELINE_RUN_ID:-$$(date -u +%Y%m%dT%H%M%SZ)}; \
	dvc repro prepare && { python -m tools.plan || echo "(no plan: see the error above; the stages check their own memory)"; } && \
	dvc repro

plan: $(STAMP) ## Each stage's predicted time and peak memory for the configured model on this machine (MODEL=… MEMORY=16GB RATES=configs/rates/avx2-epyc-derived.json: another machine's)
	python -m tools.plan $(if $(MODEL),--model $(MODEL)) $(if $(MEMORY),--memory $(MEMORY)) $(if $(RATES),--rates $(RATES))

test: $(STAMP) ## Every test: what CI runs (the real model end to end, DVC pipelines, kill -9 recovery)
	python -m pytest

test-fast: $(STAMP) ## Unit tests only, in-process (no pipeline, no subprocess stages): run before each commit
	python -m pytest -m "not slow" -q

lint: $(STAMP) ## ruff on the library, stages, tools and tests
	ruff check src stages tools tests

BENCH_SAMPLES ?= 16
fuzz: $(STAMP) ## The generated bad-input suite with ten times the examples of make test (params past their limits, damaged files of every kind)
	HYPOTHESIS_PROFILE=fuzz python -m pytest tests/test_fuzz.py -q

verify-repro: $(STAMP) ## Reproducibility checks: no-op re-run, downstream-only reruns, same seed → same data and adapter, experiments in MLflow
	python -m pytest -m repro

verify-failure: $(STAMP) ## Failure injection: kill -9 each heavy stage mid-way and rerun; concurrent repro refused; bad-input matrix
	python -m pytest -m failure

bench-finetune: $(STAMP) ## The finetune stage vs alpaca-lora's loop, side by side, into docs/benchmarks.md (BENCH_SAMPLES=16; BENCH_SOURCE=alpaca.json samples that file)
	dvc repro base prepare
	python -m tools.bench_finetune --samples $(BENCH_SAMPLES) --levers --json reports/bench-finetune.json --doc docs/benchmarks.md $(if $(BENCH_SOURCE),--source $(BENCH_SOURCE))

SWEEP_SOURCE ?= ../shared/data/alpaca_cleaned_head.json
sweep: $(STAMP) ## The recipe study: configs/sweep.yaml (recipes × seeds) as DVC experiments on SWEEP_SOURCE, scored on its held-out part; docs/recipes.md
	python -m tools.sweep --grid configs/sweep.yaml --source $(SWEEP_SOURCE) --doc docs/recipes.md

sweep-offline: $(STAMP) ## The offline default's study: configs/sweep-offline.yaml trained on the bundled sample, scored on SWEEP_SOURCE's held-out part
	python -m tools.sweep --grid configs/sweep-offline.yaml --source data/sample/alpaca_sample.json \
	  --heldout-source $(SWEEP_SOURCE) --doc docs/recipes.md

generate: $(STAMP) ## Complete PROMPT with models/gguf/finetuned-$(QUANT).gguf, N tokens (Alpaca template unless RAW=1)
	python -m tools.generate --model $(GGUF) -n $(N) --prompt "$$PROMPT" $(if $(RAW),--raw)

generate-all: $(STAMP) ## make generate for every GGUF in models/gguf/ (reference and each quantization)
	@for f in models/gguf/finetuned-*.gguf; do q=$${f#models/gguf/finetuned-}; q=$${q%.gguf}; echo "== $$q"; \
	  python -m tools.generate --model $$f -n $(N) --prompt "$$PROMPT" $(if $(RAW),--raw) || exit $$?; done

chat: $(STAMP) ## Interactive REPL on models/gguf/finetuned-$(QUANT).gguf, streaming tokens (empty line quits)
	python -m tools.generate --model $(GGUF) -n $(N) --chat $(if $(RAW),--raw)

serve: $(STAMP) ## OpenAI-compatible server for models/gguf/finetuned-$(QUANT).gguf on 127.0.0.1:$(PORT)
	python -m tools.serve --model $(GGUF) --port $(PORT)

AR_LEVEL ?= q4_0
AR_ITERS ?= 0 25 50 100 200
GPTQ_LEVELS ?= q4_0 iq4_nl
GPTQ_DAMP ?= 0.003 0.01 0.03
GPTQ_REFIT ?=
bench-autoround: $(STAMP) ## AutoRound's KLD vs wall time per iters (AR_ITERS="0 25 50 100 200") for AR_LEVEL=q4_0, beside llama.cpp's plain and imatrix files, into docs/benchmarks.md (after make repro)
	python -m tools.bench_autoround --params params.yaml --level $(AR_LEVEL) --iters $(AR_ITERS) \
		--src models/gguf/finetuned-reference.gguf --imatrix models/imatrix/imatrix.gguf --doc docs/benchmarks.md

bench-gptq: $(STAMP) ## GPTQ in Q4_0 / Q5_0 / IQ4_NL blocks (GPTQ_LEVELS="q4_0 iq4_nl", also recipe names or searched, GPTQ_DAMP="0.003 0.01 0.03", GPTQ_REFIT=1: also the joint refit, GPTQ_ACT=1: also act-order) vs llama.cpp's plain and imatrix rounding: KLD, PPL, proxy error, time, into docs/benchmarks.md (after make repro)
	python -m tools.bench_gptq --params params.yaml --levels $(GPTQ_LEVELS) --damp $(GPTQ_DAMP) $(if $(GPTQ_REFIT),--joint-refit) $(if $(GPTQ_ACT),--act-order) \
		--src models/gguf/finetuned-reference.gguf --imatrix models/imatrix/imatrix.gguf \
		--hessians models/imatrix/hessians --doc docs/benchmarks.md

bench-infer: $(STAMP) ## Generation tok/s of models/gguf/finetuned-$(QUANT).gguf vs the memory-bandwidth bound, into docs/benchmarks.md
	python -m tools.bench_infer --params params.yaml --gguf $(GGUF) --doc docs/benchmarks.md

SERVE_REQUESTS ?= 50
SERVE_CONCURRENCY ?= 4
bench-serve: $(STAMP) ## Load test of make serve on 127.0.0.1 (SERVE_REQUESTS=50 from SERVE_CONCURRENCY=4 clients): latency p50/p95 and errors, into docs/benchmarks.md
	python -m tools.bench_serve --gguf $(GGUF) --requests $(SERVE_REQUESTS) --concurrency $(SERVE_CONCURRENCY) --doc docs/benchmarks.md

SCALE_SHAPES ?= 1b 3b 7b
SCALE_LIMIT ?= 16GiB
bench-scale: $(STAMP) ## base → evaluate on synthetic 1B/3B/LLaMA-7B-shape checkpoints under a cgroup memory limit, measured next to make plan, into docs/benchmarks.md (about 40 min; the 7B shape needs 60 GB of disk)
	python -m tools.bench_scale --shapes $(SCALE_SHAPES) --limit $(SCALE_LIMIT) --work /tmp/bench-scale --doc docs/benchmarks.md --json reports/bench-scale.json

report: $(STAMP) ## Re-run evaluate (every variant) and write reports/report.md with its plots
	PIPELINE_RUN_ID=$${PIPELINE_RUN_ID:-$$(date -u +%Y%m%dT%H%M%SZ)} dvc repro report

plots: $(STAMP) ## dvc plots show into dvc_plots/index.html, offline (vega inlined); dvc plots diff <exp-a> <exp-b> works the same
	dvc plots show

mlflow-ui: $(STAMP) ## Serve the MLflow UI on 127.0.0.1:$(MLFLOW_PORT), first printing links to the variants' table and charts, the pipeline runs and the registry
	@python -m tools.mlflow_views --uri $(MLFLOW_TRACKING_URI) --base http://$(MLFLOW_HOST):$(MLFLOW_PORT) || true
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

results-table: $(STAMP) ## Put a real `dvc metrics show` of the workspace into docs/results.md (after make repro)
	python -m tools.results_table --doc docs/results.md

screenshots: $(STAMP) ## Headless Chromium (Debian's chromium, driven by Playwright) shots of the MLflow views into docs/mlflow-*.png, after make repro
	python -m tools.mlflow_views --uri $(MLFLOW_TRACKING_URI) --screenshots docs --port $(SCREENSHOT_PORT)

mlflow-server: $(STAMP) ## MLflow tracking server (SQLite + ./mlartifacts) on 127.0.0.1:$(MLFLOW_PORT); point stages at it with MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)
	mlflow server --backend-store-uri sqlite:///mlflow-server.db --artifacts-destination ./mlartifacts \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

lock: ## Re-pin requirements.lock from the current .venv (after adding a dependency)
	{ echo "# Exact versions installed by \`make setup\` (pip freeze of a working .venv). Regenerate: make lock"; \
	  pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > requirements.lock; touch $(STAMP)

clean-venv: ## Remove .venv (the next target re-creates it)
	rm -rf $(VENV)
