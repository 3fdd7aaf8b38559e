# `make run` starts a server and one local agent on SQLite; `make test` runs every test.
# Both create the virtual environment .venv first. Python 3.10 or newer is required.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080
# The tests also run against this PostgreSQL database; set it empty to test SQLite only.
TASKSCHEDULER_TEST_POSTGRES ?= postgresql://postgres@127.0.0.1:5432/test
export TASKSCHEDULER_TEST_POSTGRES

.PHONY: run test clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit("Python 3.10 or newer is required" if sys.version_info < (3, 10) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt requirements-agent.txt requirements-test.txt
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

run: $(VENV)/.installed
	@mkdir -p data
	@$(BIN)/python server.py --port $(PORT) --data-dir data & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server' EXIT INT TERM; \
	sleep 1; \
	$(BIN)/python agent.py --server http://127.0.0.1:$(PORT) --state-dir data/agent

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
