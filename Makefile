# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8501
STAMP  := $(VENV)/.moeviz-installed

.PHONY: run dev test test-fast bench install clean-venv

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

# Unit and kernel tests: pure functions, tiny models, the structure rules; no app, no demo training, no
# subprocess-heavy or @pytest.mark.slow test. A few minutes on 2 cores; `make test` runs everything.
FAST_TESTS := \
	tests/test_structure.py tests/test_runtime_config.py tests/test_resolve.py \
	tests/test_compression_kernels.py tests/test_fused_prune.py tests/test_threshold_table.py tests/test_obs.py \
	tests/test_expert_buckets.py tests/test_storage_by_hand.py tests/test_evaluation_metrics.py \
	tests/test_figures.py tests/test_store.py tests/test_plan_editing.py tests/test_model_layer.py \
	tests/test_family_layouts.py tests/test_calibration.py tests/test_loading_and_data_errors.py \
	tests/test_identity_and_input_errors.py tests/test_export_destination.py tests/test_workspace_explorer_table.py \
	tests/test_plan_form.py tests/test_session.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(FAST_TESTS)

bench: $(STAMP)
	$(PY) -m benchmarks --out benchmarks/results

clean-venv:
	rm -rf $(VENV)
