# Two commands on a fresh machine: `make run` (offline default, CPU is fine) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PARAMS ?= params/offline.yaml
STAMP := $(VENV)/.installed

.PHONY: install run report test test-fast lab clean-runs

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Execute every step notebook of PARAMS into runs/<date>_<variant>/, then render the report of all runs.
run: install
	$(PY) -m vitlab run $(PARAMS)
	$(PY) -m vitlab report

report: install
	$(PY) -m vitlab report

test: install
	$(PY) -m pytest -q

# The edit-test loop: every test but the end-to-end (runner, subprocesses, processes, browser) and slow ones.
test-fast: install
	$(PY) -m pytest -q -m "not e2e and not slow"

# JupyterLab on the repository (notebooks/, params/, runs/ and the reports all reachable), opening a
# notebooks/*.py with a double click as a notebook (a setting inside .venv, not in your ~/.jupyter).
# Containers run as root, where JupyterLab refuses to start without --allow-root.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
$(LAB_SETTINGS): $(STAMP)
	mkdir -p $(dir $@)
	echo '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}' > $@

lab: install $(LAB_SETTINGS)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root)
