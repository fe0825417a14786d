# MoRAG: `make lab` brings up the local lab and runs the main job; `make test` installs
# everything it needs and runs every test. Both work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff --config app/pyproject.toml
STAMP := $(VENV)/.installed
APT_PACKAGES := python3-venv python3-dev gcc redis-server ffmpeg espeak-ng sox \
                tesseract-ocr tesseract-ocr-eng docker.io debootstrap libnfs-utils prometheus \
                nftables haproxy
PLAYBOOKS := site.yml $(wildcard playbooks/*.yml)

.PHONY: help deps venv lint ansible-lint syntax-check unit integration test bench lab lab-down lab-local \
        docker images wheelhouse prepare molecule worker-unit clean

help:
	@echo "make lab       bring up the local lab and run the main job (gpu=true audio)"
	@echo "make lab-down  remove the lab"
	@echo "make lab-local the same job on local processes, without containers"
	@echo "make molecule  every molecule scenario (roles, then the multi-host site), timed"
	@echo "make worker-unit  the worker unit's device access on systemd 247/252/257 (in make molecule)"
	@echo "make test      install everything and run lint, unit, integration and molecule stages"
	@echo "make bench     run the benchmarks in tests/bench (not part of make test)"

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): app/pyproject.toml tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e 'app[all]' -r tests/requirements.txt
	touch $@

venv: deps $(STAMP)

lint: venv
	$(RUFF) check app/src tests tools/fleet/src
	$(RUFF) format --check app/src tests tools/fleet/src
	$(MAKE) --no-print-directory ansible-lint syntax-check

ansible-lint: venv
	$(VENV)/bin/ansible-lint --profile production

syntax-check: venv
	@for p in $(PLAYBOOKS); do \
	  PATH=$(CURDIR)/$(VENV)/bin:$$PATH ansible-playbook --syntax-check -i inventory/example/hosts.yml $$p >/dev/null || exit 1; \
	  echo "syntax ok: $$p"; \
	done

# promtool and prometheus come with `deps` (Debian's prometheus): their tests never skip here.
unit: venv
	MORAG_REQUIRE_PROMETHEUS=1 $(PY) -m pytest tests/unit -q

# The wheelhouse first: tests/integration/test_wheelhouse.py checks it offline (molecule
# reuses it). Under `make test` the prepare stage has built it (MORAG_PREPARED=1).
integration: venv $(if $(MORAG_PREPARED),,wheelhouse)
	MORAG_REQUIRE_PROMETHEUS=1 MORAG_REQUIRE_WHEELHOUSE=1 $(PY) -m pytest tests/integration -q

# Integration and molecule run side by side (tests/stages.py `a+b`): both mostly wait, on
# their own processes and on containers. Images and wheelhouse come first, once, so that
# neither rebuilds them under the other (MORAG_PREPARED=1 tells them so). When the
# integration tests end, molecule opens a third lane for the role scenarios.
test: venv
	MORAG_PREPARED=1 MORAG_MOLECULE_LANE_AFTER=.cache/stages/integration.done \
	  $(PY) tests/stages.py lint unit prepare integration+molecule

prepare: venv docker
	molecule/images/build.sh 11 12 13
	molecule/images/wheelhouse.sh

bench: venv
	$(PY) tests/bench/submit_latency.py
	$(PY) tests/bench/failover.py
	$(PY) tests/bench/batched.py
	$(PY) tests/bench/split.py
	$(PY) tests/bench/overhead.py
	$(PY) tests/bench/soak.py
	$(PY) tests/bench/fleet_scale.py

# dockerd: started by systemd where it runs, otherwise in the background (CI, containers).
docker: deps
	@if ! docker info >/dev/null 2>&1; then \
	  if [ -d /run/systemd/system ]; then systemctl start docker; \
	  else echo "starting dockerd in the background (log: /var/log/dockerd.log)"; \
	    setsid dockerd >/var/log/dockerd.log 2>&1 </dev/null & \
	  fi; \
	  for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	  docker info >/dev/null 2>&1 || { echo "dockerd did not start, see /var/log/dockerd.log"; exit 1; }; \
	fi

# Test images (debootstrap + docker import, rebuilt only when their recipe changes).
images: docker
	molecule/images/build.sh

# The app and its dependencies as wheels, for installs without PyPI in the containers.
wheelhouse: venv
	molecule/images/wheelhouse.sh

molecule: venv docker
	$(PY) molecule/run.py

# One entry of the molecule stage: tests/systemd in Debian 11/12/13 containers.
worker-unit: venv docker
	$(PY) molecule/run.py worker_unit

# The container lab: provisioned by site.yml with inventory/lab; API on 127.0.0.1:8080.
lab: venv docker
	molecule/images/build.sh 12
	molecule/images/wheelhouse.sh
	$(PY) tests/lab/lab.py up

lab-down:
	$(PY) tests/lab/lab.py down

lab-local: venv
	$(PY) tests/lab_local.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
