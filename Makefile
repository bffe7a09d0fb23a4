# featpipe — see README.md.  `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= data/sample-images
SHARDS ?= data/shards
OUT    ?= data/features
MODEL_REPO ?= facebookresearch/dinov2
MODEL_NAME ?= dinov2_vits14
PACK_FLAGS ?=
EXTRACT_FLAGS ?=

.PHONY: install test shards extract consolidate verify demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test,s3,fast]'

test: install
	$(BIN)/python -m pytest -q tests

shards: install
	$(BIN)/featpipe pack "$(DATA)" "$(SHARDS)" $(PACK_FLAGS)

extract: install
	$(BIN)/featpipe extract "$(SHARDS)" "$(OUT)" --model-repo "$(MODEL_REPO)" --model-name "$(MODEL_NAME)" $(EXTRACT_FLAGS)

consolidate: install
	$(BIN)/featpipe consolidate "$(OUT)"

verify: install
	$(BIN)/featpipe verify "$(OUT)" --shards "$(SHARDS)"

DEMO = data/demo

demo: install
	$(BIN)/python tools/make_sample_images.py $(DEMO)/images --broken
	$(BIN)/featpipe pack $(DEMO)/images $(DEMO)/shards --shard-size 16 --no-progress
	@echo "demo shards: $(DEMO)/shards (manifest: $(DEMO)/shards/manifest.json)"

bench: install
	$(BIN)/python tools/bench.py

clean:
	rm -rf data/demo bench-out
