# The two commands of the README: `make demo` and `make test`. Both install everything first.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
SHARED  ?= $(abspath ../shared)
# Model files from the project's shared mirror when present; otherwise they are downloaded and verified.
ifneq ($(wildcard $(SHARED)/models),)
export FACESHIELD_MIRROR ?= $(SHARED)/models
endif
export FACESHIELD_SHARED ?= $(SHARED)

.PHONY: install demo test calibrate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml tests/reference/tfjs/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the small CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# the reference TF.js runtime (pure-JS CPU backend) that our TF.js executor is validated against
	npm ci --silent --no-audit --no-fund --prefix tests/reference/tfjs
	touch $@

samples/astronaut.png: | install
	$(PY) scripts/make_samples.py samples

demo: install samples/astronaut.png
	$(VENV)/bin/faceshield protect samples/astronaut.png -o samples/protected
	@echo "--- before: the original photo against another photo of her"
	$(VENV)/bin/faceshield verify samples/astronaut.png samples/astronaut_second.jpg
	@echo "--- after: the protected photo against the same other photo"
	$(VENV)/bin/faceshield verify samples/protected/astronaut_protected.png samples/astronaut_second.jpg

test: install
	$(VENV)/bin/python -m pytest -q --durations=10

calibrate: install
	$(VENV)/bin/faceshield calibrate $(SHARED)/data/celebahq-pairs --output src/faceshield/data/calibration.json

clean:
	rm -rf $(VENV) samples tests/reference/tfjs/node_modules
