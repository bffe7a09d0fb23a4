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
# Test processes: two fit a 2-core machine (the suite is mostly subprocesses starting torch; 20 → 12 min there)
TEST_WORKERS ?= 2

.PHONY: install install-demo test lint shards extract consolidate verify demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test,s3,faiss]'

# What the demo runs, without the test-only extras (selenium, moto, the model libraries, …)
install-demo: $(BIN)/python
	$(BIN)/pip install -q -e '.[faiss,serve]'

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

lint: install
	$(BIN)/ruff check pipeline tools tests
	$(BIN)/ruff format --check pipeline tools tests

shards: install
	$(BIN)/featpipe pack "$(DATA)" "$(SHARDS)" $(PACK_FLAGS)

extract: install
	$(BIN)/featpipe extract "$(SHARDS)" "$(OUT)" --model-repo "$(MODEL_REPO)" --model-name "$(MODEL_NAME)" $(EXTRACT_FLAGS)

consolidate: install
	$(BIN)/featpipe consolidate "$(OUT)"

verify: install
	$(BIN)/featpipe verify "$(OUT)" --shards "$(SHARDS)"

DEMO = data/demo

# Offline: sample images (with deliberately broken files and planted near-duplicates) → shards →
# features from a random-weight ViT in featpipe's local hub → neighbours, duplicate groups, a page.
# Exit status 3 from extract means "done, with recorded failures".
demo: install-demo
	$(BIN)/python tools/make_sample_images.py $(DEMO)/images --broken --duplicates
	$(BIN)/featpipe pack $(DEMO)/images $(DEMO)/shards --shard-size 16 --overwrite --no-progress
	$(BIN)/featpipe extract $(DEMO)/shards $(DEMO)/features --model-repo pipeline/hub --model-name vit_tiny_p14 \
		--batch-size 16 --overwrite --no-progress; status=$$?; [ $$status -eq 0 ] || [ $$status -eq 3 ]
	$(BIN)/featpipe verify $(DEMO)/features --shards $(DEMO)/shards
	$(BIN)/featpipe match $(DEMO)/features $(DEMO)/matches -k 5 --overwrite --no-progress
	$(BIN)/featpipe dedup $(DEMO)/features $(DEMO)/dedup --threshold 0.98 --overwrite --no-progress
	$(BIN)/featpipe show $(DEMO)/matches $(DEMO)/matches.html --sample 20
	$(BIN)/featpipe show $(DEMO)/dedup $(DEMO)/dedup.html
	$(BIN)/featpipe index $(DEMO)/features $(DEMO)/index --overwrite --no-progress
	@echo
	@$(BIN)/python tools/demo_report.py $(DEMO)/dedup
	@echo "shards:   $(DEMO)/shards (manifest.json lists the files pack skipped, and why)"
	@echo "features: $(DEMO)/features/fts.npy (float16), fts.pth (float32), img_list.json (row-aligned paths)"
	@echo "failures: $(DEMO)/features/errors.jsonl; Parquet chunks for faiss/autofaiss: $(DEMO)/features/chunks/"
	@echo "matches:  $(DEMO)/matches/matches.npy, scores.npy, neighbors.parquet; groups: $(DEMO)/dedup/groups.json"
	@echo "pages:    $(DEMO)/matches.html, $(DEMO)/dedup.html (open in a browser, offline)"
	@echo "index:    $(DEMO)/index (index.faiss, ids.parquet, index.json)"
	@echo
	@echo "Serve it (the page and the API at http://127.0.0.1:8000/; Ctrl-C stops it):"
	@echo "    $(BIN)/featpipe serve $(DEMO)/index --port 8000"

bench: install
	$(BIN)/python tools/bench.py
	$(BIN)/python tools/bench_match.py
	$(BIN)/python tools/bench_pack_plan.py
	$(BIN)/python tools/bench_stores.py
	$(BIN)/python tools/bench_serve.py
	$(BIN)/python tools/bench_models.py
	$(BIN)/python tools/bench_grow.py
	$(BIN)/python tools/bench_index.py
	$(BIN)/python tools/bench_scale.py
	$(BIN)/python tools/bench_interop.py

# autofaiss for bench_index.py and bench_interop.py, in its own venv: it pins numpy < 2, and its OPQ code calls
# faiss.OPQMatrix with keywords that faiss 1.8+ refuses (faiss-cpu < 1.8), pyarrow 20 to import
AUTOFAISS_VENV := bench-out/autofaiss-venv
bench: $(AUTOFAISS_VENV)/bin/autofaiss
$(AUTOFAISS_VENV)/bin/autofaiss:
	$(PYTHON) -m venv $(AUTOFAISS_VENV)
	$(AUTOFAISS_VENV)/bin/pip install -q autofaiss "faiss-cpu<1.8" "pyarrow==20.0.0"

clean:
	rm -rf data/demo bench-out
