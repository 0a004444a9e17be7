# The README's two commands: `make test` and `make demo`. Both create .venv and install into it.
# TORCH: which torch to install first. The default is the CPU wheel used by CI; on a GPU host use e.g.
#   make test TORCH="torch"     (or any torch>=2.6 already matching your CUDA)
VENV ?= .venv
TORCH ?= torch==2.13.0
# Where torch comes from: empty = pip's configured indexes (CI's machines hold a CPU wheel of 2.13.0
# locally). Elsewhere PyPI's Linux wheel is a multi-GB CUDA build; for CPU-only:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
EXTRAS ?= test
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: install test demo bench-smoke clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: anything that depends on torch would otherwise pull a multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
test: install
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: install
	$(PY) -m lvmae_fast demo --out runs/demo --overwrite

bench-smoke: install
	$(PY) bench/pretrain.py --preset tiny --device cpu --steps 2 --warmup 1 --batch-sizes 4,16 --long-len 1024

# Only what install and demo made: runs/ also holds the user's own runs (README's examples write there).
clean:
	rm -rf $(VENV) runs/demo *.egg-info
