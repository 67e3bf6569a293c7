# Two entry points, both bootstrap a fresh Debian 12 machine (run as root, or with sudo):
#   make demo   - an active/standby pair on this machine
#   make test   - the whole test suite (what CI runs)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest
APT_PACKAGES := python3-venv procps iputils-ping kamailio kamailio-extra-modules sip-tester \
	redis-server redis-sentinel \
	tshark nftables iproute2 tcpdump systemd
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bootstrap apt venv lint bench clean

demo: bootstrap
	$(PY) -m sidecar demo

test: bootstrap lint
	$(PYTEST) -q

bootstrap: apt venv

# Debian packages the tests use (real Kamailio, SIPp, Redis, capture tools). Skipped when
# everything is already installed, so repeated runs cost nothing.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			$$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check sidecar tests benchmarks proto compose

bench: bootstrap
	$(PY) -m benchmarks replication --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
