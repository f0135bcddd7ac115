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

# The judge is a model the protection never attacked (dlib-resnet, held out with --surrogates -dlib-resnet), seeing
# the photos through a detector and an alignment the protection never used (--pipeline independent).
JUDGE := --models dlib-resnet --pipeline independent
demo: install samples/astronaut.png
	$(VENV)/bin/faceshield protect samples/astronaut.png -o samples/protected --surrogates -dlib-resnet --overwrite
	@echo "--- before: the original photo against another photo of her, judged by an unseen model and pipeline"
	$(VENV)/bin/faceshield verify samples/astronaut.png samples/astronaut_second.jpg $(JUDGE)
	@echo "--- after: the protected photo against the same other photo, same judge"
	$(VENV)/bin/faceshield verify samples/protected/astronaut_protected.png samples/astronaut_second.jpg $(JUDGE)
	@echo "--- after, every calibrated model (those the protection attacked included), independent pipeline"
	$(VENV)/bin/faceshield verify samples/protected/astronaut_protected.png samples/astronaut_second.jpg \
		--pipeline independent

test: install
	$(VENV)/bin/python -m pytest -q --durations=10

calibrate: install
	$(VENV)/bin/faceshield calibrate $(SHARED)/data/celebahq-pairs --output src/faceshield/data/calibration.json

clean:
	rm -rf $(VENV) samples tests/reference/tfjs/node_modules
