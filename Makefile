# prm-ray: `make demo` and `make test` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= cpu
POLICY ?= artifacts/policy

.PHONY: install lint test check demo paper baselines policy constraints config-docs clean-venv

install: $(STAMP)

# Reinstall only when the dependencies, their pinned versions or the install script change.
$(STAMP): pyproject.toml constraints-cpu.txt scripts/install.sh
	EXTRAS=$(EXTRAS) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(PY) -m pytest -q tests

# What CI runs: the linter, then the tests.
check: lint test

# The main job, submitted to a local Ray head the way a cluster user submits it. A head that is
# already up is used as is; one started here is stopped afterwards. PATH puts the venv's python
# first, so the job's `python` is this environment's. Ray >= 2.59 protects local heads with a
# token (~/.ray/auth_token); the job CLI only sends it with RAY_AUTH_MODE=token. The check asks
# the job server itself: `ray status` also succeeds for a local cluster started by `ray.init()` (a
# test or a benchmark), which has no job server to submit to.
# JOB: any study in jobs/ (scale_responses, scale_instructions, compare_objectives, compare_baselines).
# DEMO_CONFIG: the study's size (configs/demo.yaml: one training seed, 150 test problems x 16 samples).
DEMO_ARGS ?=
DEMO_CONFIG ?= configs/demo.yaml
JOB ?= scale_responses
RUNS ?= $(CURDIR)/runs
demo: $(STAMP)
	@export PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_AUTH_MODE=token; started=0; \
	ray get-auth-token --generate >/dev/null || exit 1; \
	if ! ray job list >/dev/null 2>&1; then \
	  echo "starting a local Ray head (ray stop to stop it)"; \
	  ray start --head --disable-usage-stats >/dev/null && started=1 || exit 1; \
	fi; \
	ray job submit --working-dir . -- python jobs/$(JOB).py --config $(DEMO_CONFIG) \
	  --runs_dir "$(RUNS)" --policy "$(CURDIR)/$(POLICY)" $(DEMO_ARGS); \
	rc=$$?; if [ $$started = 1 ]; then ray stop >/dev/null; fi; exit $$rc

# Every table and figure of the paper (docs/evaluation.md, "make paper"): the studies at full size
# (configs/paper/: 3 training seeds, 500 test problems) one after another in one runs directory,
# so each reuses what the others made; run it again to resume (finished stages are reused). Each
# entry of PAPER_STUDIES is a config under configs/paper/ run by the job its first path component
# names (compare_objectives/table4: jobs/compare_objectives.py), as run `<entry with / as ->`;
# its report, plots and resolved config are copied to docs/results/paper/<entry>/. Every entry
# fits a few hours on 2 CPU cores, so a machine that does not outlive the day can run them one
# at a time (PAPER_STUDIES=<entry>), committing each. A progress line per stage; the report gives
# each stage's wall time. Then scripts/paper_tables.py puts the parts of Table 1 and Figure 4 together
# (docs/results/paper/table1.md, figure4/).
PAPER_RUNS ?= $(CURDIR)/runs-paper
PAPER_STUDIES ?= scale_responses compare_objectives/table1 compare_objectives/table4 \
  compare_objectives/table1-weaker compare_objectives/table1-stronger compare_baselines \
  scale_instructions/1k-4k scale_instructions/8k
PAPER_RESULTS ?= docs/results/paper
paper: $(STAMP)
	@for study in $(PAPER_STUDIES); do \
	  job=$${study%%/*}; name=$$(echo $$study | tr / -); \
	  echo "== make paper: $$study (configs/paper/$$study.yaml, jobs/$$job.py), $$(date -u '+%F %T') UTC"; \
	  $(MAKE) --no-print-directory demo JOB=$$job RUNS="$(PAPER_RUNS)" DEMO_CONFIG=configs/paper/$$study.yaml \
	    DEMO_ARGS="--name $$name $(DEMO_ARGS)" || exit 1; \
	  mkdir -p $(PAPER_RESULTS)/$$study && cp $(PAPER_RUNS)/$$name/report.md $(PAPER_RUNS)/$$name/report.json \
	    $(PAPER_RUNS)/$$name/config.yaml $(PAPER_RUNS)/$$name/*.png $(PAPER_RESULTS)/$$study/ || exit 1; \
	done; $(PY) scripts/paper_tables.py --results $(PAPER_RESULTS) || exit 1; \
	echo "== make paper: done, $$(date -u '+%F %T') UTC; results in $(PAPER_RESULTS)"

# The implicit PRM against Math-Shepherd, with compute (docs/baselines.md).
baselines:
	$(MAKE) demo JOB=compare_baselines

# Retrain the default policy from scratch (about 15-20 minutes on 2 cores).
policy: $(STAMP)
	$(PY) jobs/bootstrap_policy.py --out $(POLICY) --overwrite

# Refresh constraints-cpu.txt: the newest versions pyproject.toml allows, in a fresh venv. Run
# `make test` with them before committing the new file.
constraints:
	rm -rf .venv-constraints
	CONSTRAINTS= EXTRAS=cpu VENV=.venv-constraints bash scripts/install.sh
	{ sed -n '1,3p' constraints-cpu.txt; .venv-constraints/bin/python -m pip freeze --exclude-editable \
	  | grep -v '^-e ' | grep -iv '^prm-ray'; } > constraints-cpu.txt.new
	mv constraints-cpu.txt.new constraints-cpu.txt
	rm -rf .venv-constraints

# Regenerate docs/config.md from the config classes (a test fails when it is out of date).
config-docs: $(STAMP)
	$(PY) scripts/config_docs.py

clean-venv:
	rm -rf $(VENV)
