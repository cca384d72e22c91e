# Two commands for a fresh Debian 12 machine, as root:
#   make run    install everything, then run both services on a private bus, in a mount namespace of their own
#   make test   install everything, then run the test suite
# and, while make run runs, in another shell:
#   make shell  a shell in make run's namespace, with its bus (or make shell CMD='machinectl list-images')
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTHON ?= python3

APT_PACKAGES := python3 python3-venv python3-pip dbus-daemon dbus-system-bus-common systemd-container btrfs-progs \
	libbtrfsutil-dev systemd-userdbd libnss-mymachines qemu-utils gnupg xz-utils zstd \
	busybox-static attr acl e2fsprogs fdisk util-linux coreutils tar mount gcc pkg-config \
	bzip2 strace curl iproute2 procps bsdutils debootstrap rsync isal nginx-light tmux \
	docker-registry skopeo umoci openssl
SID_PACKAGES := systemd,systemd-container,dbus,systemd-userdbd,btrfs-progs,xz-utils,zstd,gnupg,busybox-static,libarchive13t64,curl,ca-certificates
# Debian 12 to boot with systemd as PID 1, for make install in place of systemd's daemons (tests/test_install.py).
BOOKWORM_PACKAGES := systemd,systemd-sysv,dbus,systemd-container,libpam-systemd,polkitd,python3,python3-venv,make,tar,xz-utils,gnupg,busybox-static,btrfs-progs,libbtrfsutil1
ROOTS := $(CURDIR)/.cache/roots
# Wheels of the dependencies (and of the build backend), for make install WHEELS=... without network.
WHEELHOUSE := $(CURDIR)/.cache/wheels

# make install: the services in place of systemd-machined and systemd-importd (tools/install).
PREFIX ?= /usr/local
DESTDIR ?=
# The wheelhouse make deps built, when there is one (WHEELS= on the command line: from the package index instead).
WHEELS ?= $(if $(wildcard $(WHEELHOUSE)/.complete),$(WHEELHOUSE))
# The interpreter of the installed services' virtual environment: the system's, not one on PATH (pyenv, say).
INSTALL_PYTHON ?= /usr/bin/python3

.PHONY: deps apt venv roots wheels run shell test bench clean install install-check uninstall

deps: apt venv roots wheels

# Debian sid with the newest systemd: its clients and daemons are the tests' second reference.
# Debian 12, booted: where the tests install the services in place of systemd's.
roots: apt
	tools/build-root sid sid $(SID_PACKAGES) $(ROOTS)
	tools/build-root bookworm bookworm $(BOOKWORM_PACKAGES) $(ROOTS)

wheels: $(WHEELHOUSE)/.complete

$(WHEELHOUSE)/.complete: pyproject.toml tools/wheels | venv
	PYTHON=$(PY) tools/wheels $(WHEELHOUSE)

install:
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' WHEELS='$(WHEELS)' PYTHON='$(INSTALL_PYTHON)' tools/install install

# What make install would put where (same variables), and whether anything not ours is in the way; changes nothing.
install-check:
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' tools/install check

uninstall:
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' tools/install uninstall

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

# Enters the namespace of the make run above (tools/run-shell); CMD, if given, is run by bash there, as written
# ($(value CMD): make expands no $ in it).
shell:
	@cmd='$(subst ','\'',$(value CMD))'; tools/run-shell $(CURDIR)/.run $${cmd:+bash -c "$$cmd"}

test: deps
	$(PY) -m pytest

bench: deps
	$(PY) bench/images.py

clean:
	rm -rf .run .pytest_cache
