# Two commands for a fresh Debian 12 machine, as root:
#   make run    install everything, then run both services on a private bus
#   make test   install everything, then run the test suite
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTHON ?= python3

APT_PACKAGES := python3 python3-venv python3-pip dbus-daemon systemd-container btrfs-progs \
	libbtrfsutil-dev systemd-userdbd libnss-mymachines qemu-utils gnupg xz-utils zstd \
	busybox-static attr acl e2fsprogs fdisk util-linux coreutils tar mount gcc pkg-config \
	bzip2 strace curl iproute2 procps bsdutils debootstrap rsync isal nginx-light tmux \
	docker-registry skopeo umoci openssl
SID_PACKAGES := systemd,systemd-container,dbus,systemd-userdbd,btrfs-progs,xz-utils,zstd,gnupg,busybox-static,libarchive13t64,curl,ca-certificates
ROOTS := $(CURDIR)/.cache/roots

.PHONY: deps apt venv roots run test bench clean

deps: apt venv roots

# Debian sid with the newest systemd: its clients and daemons are the tests' second reference.
roots: apt
	tools/build-root sid sid $(SID_PACKAGES) $(ROOTS)

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: deps
	$(PY) -m imagepool.dev run $(CURDIR)/.run

test: deps
	$(PY) -m pytest

bench: deps
	$(PY) bench/images.py

clean:
	rm -rf .run .pytest_cache
