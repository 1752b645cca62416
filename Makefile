# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8501
STAMP  := $(VENV)/.moeviz-installed

.PHONY: run dev test bench install clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip

# Re-install when the project's dependencies change.
$(STAMP): $(PY) pyproject.toml setup.py scripts/install_torch.sh
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,eval]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m streamlit run app.py --server.address localhost --server.port $(PORT) --server.fileWatcherType none

# For developing the app: reload on save, watching the project's files but never the virtualenv.
dev: $(STAMP)
	$(PY) -m streamlit run app.py --server.address localhost --server.port $(PORT) \
		--server.fileWatcherType auto --server.runOnSave true --server.folderWatchBlacklist '["$(VENV)"]'

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m benchmarks --out benchmarks/results

clean-venv:
	rm -rf $(VENV)
