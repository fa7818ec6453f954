# pagctl: two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PAGCTL := $(VENV)/bin/pagctl
DEMO_DIR ?= runs/demo
STAMP := $(VENV)/.pagctl-installed

.PHONY: install demo toy results results-at study study-quick test test-slow test-plugins bench lint docs clean
PLUGINS := $(wildcard plugins/*/pyproject.toml)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plots]'
	$(PY) -m pip install -q --no-deps 'robustbench==1.1.1'  # its zoo, for tests/test_robustbench.py
	touch $(STAMP)

install: $(STAMP)

# Train a vanilla and a PAG (nearest-neighbour) small CNN on the embedded digits, attack both
# with PGD-L2 over an eps sweep, score their gradient alignment with nearest-neighbour targets,
# and compare them side by side with plots. About 5 minutes on 2 cores.
demo: install
	$(PAGCTL) train digits-vanilla --out $(DEMO_DIR)/digits-vanilla --overwrite
	$(PAGCTL) train digits-pag-nn --out $(DEMO_DIR)/digits-pag-nn --overwrite
	for run in digits-vanilla digits-pag-nn; do \
	  $(PAGCTL) attack $(DEMO_DIR)/$$run --attack pgd_l2 --param steps=50 \
	    --eps-sweep 0.25,0.5,0.75,1,1.5 --format json > /dev/null || exit 1; \
	  $(PAGCTL) align-score $(DEMO_DIR)/$$run --source nearest_neighbor --format json \
	    > /dev/null || exit 1; done
	$(PAGCTL) compare $(DEMO_DIR)/digits-vanilla $(DEMO_DIR)/digits-pag-nn \
	  --plot $(DEMO_DIR)/compare.png

# The 2-D toy experiment: vanilla vs PAG with the exact score (and nearest neighbour), five
# seeds, exact (grid) and attack robustness over an L2 epsilon sweep; figures and
# results.json in runs/toy (docs/toy.md). About 1-2 minutes on 2 cores.
toy: install
	$(PY) -m pagctl.toy_experiment --out runs/toy

# docs/results-sources.md: a digits score model, then vanilla and PAG with one image, class mean,
# nearest neighbour and SBG (same spec budget and seed), each attacked with AutoAttack L2 at
# eps 0.5 and 1 and L-infinity at eps 0.1 and 0.15 on all 360 test images and scored against
# SBG targets; compare table + plot. About 1.5 hours on 2 quiet cores (AutoAttack's Square
# stage dominates).
RESULTS_DIR ?= runs/results
# AutoAttack L2 (eps 0.5, 1) and L-infinity (eps 0.1, 0.15) on all 360 digits test images,
# and the alignment with the SBG targets, for each run folder named in $(1)
define evaluate_digits
	for run in $(1); do \
	  $(PAGCTL) attack $(RESULTS_DIR)/$$run --attack autoattack --param norm=l2 \
	    --eps-sweep 0.5,1 --format json > /dev/null || exit 1; \
	  $(PAGCTL) attack $(RESULTS_DIR)/$$run --attack autoattack --param norm=linf \
	    --eps-sweep 0.1,0.15 --format json > /dev/null || exit 1; \
	  $(PAGCTL) align-score $(RESULTS_DIR)/$$run --source sbg \
	    --param run=$(RESULTS_DIR)/score-digits --format json > /dev/null || exit 1; done
endef
RESULTS_RUNS := digits-vanilla digits-pag-oi digits-pag-cm digits-pag-nn digits-pag-sbg
results: install
	$(PAGCTL) train-score score-digits --out $(RESULTS_DIR)/score-digits --overwrite -q
	for run in $(filter-out digits-pag-sbg,$(RESULTS_RUNS)); do \
	  $(PAGCTL) train $$run --out $(RESULTS_DIR)/$$run --overwrite -q \
	    --format json > /dev/null || exit 1; done
	$(PAGCTL) train digits-pag-sbg --out $(RESULTS_DIR)/digits-pag-sbg --overwrite -q \
	  --set target_gradients.params.run=$(RESULTS_DIR)/score-digits --format json > /dev/null
	$(call evaluate_digits,$(RESULTS_RUNS))
	$(PAGCTL) compare $(addprefix $(RESULTS_DIR)/,$(RESULTS_RUNS)) --format markdown \
	  --plot $(RESULTS_DIR)/compare.png | tee $(RESULTS_DIR)/compare.md

# docs/results-at.md: PGD-AT and TRADES (L-infinity eps 0.1) alone and
# + PAG with nearest-neighbour and SBG targets, next to vanilla, PAG-NN and PAG-SBG from
# 'make results' (run it first: the score model and those three runs are reused), each
# attacked with AutoAttack L2 (0.5, 1) and L-infinity (0.1, 0.15) on all 360 test images,
# scored against SBG targets; compare table and pair tests in runs/results/compare-at.md.
# About 2.5 hours on 2 quiet cores.
AT_PLAIN := digits-pgd-at digits-pgd-at-pag-nn digits-trades digits-trades-pag-nn
AT_SBG := digits-pgd-at-pag-sbg digits-trades-pag-sbg
results-at: install
	test -f $(RESULTS_DIR)/score-digits/model.safetensors || $(MAKE) results
	for run in $(AT_PLAIN); do \
	  $(PAGCTL) train $$run --out $(RESULTS_DIR)/$$run --overwrite -q \
	    --format json > /dev/null || exit 1; done
	for run in $(AT_SBG); do \
	  $(PAGCTL) train $$run --out $(RESULTS_DIR)/$$run --overwrite -q --format json \
	    --set target_gradients.params.run=$(RESULTS_DIR)/score-digits > /dev/null || exit 1; done
	$(call evaluate_digits,$(AT_PLAIN) $(AT_SBG))
	$(PAGCTL) compare $(addprefix $(RESULTS_DIR)/,digits-vanilla digits-pag-nn digits-pag-sbg \
	  $(AT_PLAIN) $(AT_SBG)) --format markdown | tee $(RESULTS_DIR)/compare-at.md

# The paper's claims on the digits in one report (pagctl.study): a lambda sweep for NN and
# SBG, three seeds, four architecture families, AutoAttack L2 (0.5, 1) and Linf (0.1, 0.15) on
# all 360 test points, alignment; trains and measures only what $(STUDY_DIR) lacks, then
# writes docs/results.md and docs/results-lambda.png, in two processes of one thread each.
# About 2 hours on 2 CPU cores: the report's 2026-12 run recorded 244 min of one-worker
# compute (score model 1.5, training 68, AutoAttack 175, alignment 0.1), 126 min for the slower
# of the two workers; rerun after an interruption to continue.
STUDY_DIR ?= runs/study
study: install
	$(PY) -m pagctl.study --out $(STUDY_DIR) --report docs/results.md --jobs 2

# The same pipeline on a tiny budget (about a minute): its numbers test the pipeline only.
study-quick: install
	$(PY) -m pagctl.study --quick --out runs/study-quick

# The default suite (no slow/cuda/plugins tests). Exit 5 (nothing collected) is a failure.
test: install
	PAGCTL_DISABLE_PLUGIN_AUTOLOAD=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken"; exit 1; fi; \
	exit $$rc

# Slow tests (minutes); no slow test collected is fine here.
test-slow: install
	PAGCTL_DISABLE_PLUGIN_AUTOLOAD=1 $(PY) -m pytest -q -m slow; rc=$$?; \
	if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The packages under plugins/, installed editable into the venv, and their own tests.
test-plugins: install
	$(PY) -m pip install -q $(foreach p,$(PLUGINS),-e $(dir $(p)))
	$(PY) -m pytest -q -m plugins plugins

# Regenerate docs/cli.md, docs/spec.md and docs/writing-plugins.md from the code.
docs: install
	$(PY) -m pagctl._docgen

bench: install
	$(PY) benchmarks/bench_pag_step.py --variants
	$(PY) benchmarks/bench_data_parallel.py --procs 1,2
	$(PY) benchmarks/bench_attacks.py
	$(PY) benchmarks/bench_at_step.py

lint: install
	$(PY) -m ruff check pagctl tests benchmarks
	$(PY) -m mypy pagctl

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
