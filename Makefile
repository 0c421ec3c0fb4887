# prm-ray: `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= cpu
POLICY ?= artifacts/policy

.PHONY: install test demo policy clean-venv

install: $(STAMP)

# Reinstall only when the dependencies or the install script change.
$(STAMP): pyproject.toml scripts/install.sh
	EXTRAS=$(EXTRAS) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) jobs/bootstrap_policy.py --out $(POLICY)

# Retrain the default policy from scratch (about 15-20 minutes on 2 cores).
policy: $(STAMP)
	$(PY) jobs/bootstrap_policy.py --out $(POLICY) --force

clean-venv:
	rm -rf $(VENV)
