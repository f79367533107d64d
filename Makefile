# podvisor: `make test` builds everything (guest image included) and runs every test;
# `make demo` boots a VM and shows the guest kernel; `make bench` prints the benchmarks.
# Each of them installs what a fresh Debian 12 machine lacks first (scripts/deps.sh).

SHELL      := /bin/bash
CARGO      ?= cargo
TARGET     := x86_64-unknown-linux-gnu
AGENT      := target/$(TARGET)/release/kata-agent
GUEST_DIR  := build/guest
PREFIX     ?= /usr/local
SHAREDIR   ?= /usr/share/kata-containers
DEFAULTSDIR ?= /usr/share/defaults/kata-containers
SYSTEMDDIR ?= /etc/systemd/system
export PATH := /usr/local/bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: all deps build agent guest-image test bench demo soak fuzz install check clean

all: build guest-image

deps:
	@scripts/deps.sh

# Host binaries (the shim, test tools).
build:
	$(CARGO) build --release --workspace --exclude podvisor-agent

# The agent: a static binary (glibc, static-pie); an explicit --target keeps build scripts and
# proc-macros dynamic. libseccomp (OCI seccomp in containers) is linked statically from Debian's
# libseccomp-dev (libseccomp.a).
agent:
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release -p podvisor-agent --target $(TARGET)

guest-image: agent
	guest-image/build.sh --agent $(AGENT) --out $(GUEST_DIR)

# The containerd tests run the shim, kata-runtime, kata-monitor and the remote hypervisor service,
# which `cargo test` does not build by itself.
test: deps guest-image
	$(CARGO) build -p podvisor-shim -p podvisor-runtime -p podvisor-monitor -p podvisor-remote-hypervisor
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2

bench: deps guest-image
	$(CARGO) build --release -p podvisor-shim -p podvisor-monitor
	$(CARGO) run --release -q -p podvisor-tests --bin podvisor-vm -- bench
	$(CARGO) run --release -q -p podvisor-tests --bin podvisor-demo -- bench
	$(CARGO) run --release -q -p podvisor-tests --bin podvisor-cri-bench
	$(CARGO) run --release -q -p podvisor-tests --bin podvisor-monitor-bench
	$(CARGO) build --release -q -p podvisor-remote-hypervisor
	$(CARGO) run --release -q -p podvisor-tests --bin podvisor-peerpod-bench

# Create/delete cycles through containerd and CRI-O with faults (tests/src/soak.rs); CYCLES=200.
soak: deps guest-image
	$(CARGO) build --release -p podvisor-shim
	$(CARGO) run --release -q -p podvisor-tests --bin podvisor-soak -- --cycles $(or $(CYCLES),200)

demo: deps guest-image
	$(CARGO) build --release -p podvisor-shim
	$(CARGO) run --release -q -p podvisor-tests --bin podvisor-demo

# The long fuzzing pass (fuzz/README.md): every target for FUZZ_SECONDS (default 60) with seed
# FUZZ_SEED (default: the time); crashing inputs go to fuzz/crashes/<target>/. Debug builds, so
# that integer overflows panic as they do in `cargo test`.
fuzz:
	@secs=$${FUZZ_SECONDS:-60}; seed=$${FUZZ_SEED:-$$(date +%s)}; rc=0; \
	$(CARGO) run -q -p podvisor-fuzz -- --seconds $$secs --seed $$seed --crash-dir $(CURDIR)/fuzz/crashes || rc=1; \
	mkdir -p fuzz/crashes; rm -f fuzz/crashes/agent-report.txt; \
	PODVISOR_FUZZ_SECONDS=$$secs PODVISOR_FUZZ_SEED=$$seed PODVISOR_FUZZ_CRASH_DIR=$(CURDIR)/fuzz/crashes \
	PODVISOR_FUZZ_REPORT=$(CURDIR)/fuzz/crashes/agent-report.txt \
	  $(CARGO) test -q -p podvisor-agent --bin kata-agent fuzz_targets -- --test-threads=1 || rc=1; \
	cat fuzz/crashes/agent-report.txt; exit $$rc

check: build
	target/release/kata-runtime check

install: build guest-image
	install -D -m 0755 target/release/containerd-shim-kata-v2 $(PREFIX)/bin/containerd-shim-kata-v2
	install -D -m 0755 target/release/kata-runtime $(PREFIX)/bin/kata-runtime
	install -D -m 0755 target/release/kata-monitor $(PREFIX)/bin/kata-monitor
	install -D -m 0644 configs/kata-monitor.service $(SYSTEMDDIR)/kata-monitor.service
	install -D -m 0755 target/release/podvisor-remote-hypervisor $(PREFIX)/bin/podvisor-remote-hypervisor
	install -D -m 0644 configs/podvisor-remote-hypervisor.service $(SYSTEMDDIR)/podvisor-remote-hypervisor.service
	install -D -m 0644 configs/configuration-remote.toml $(DEFAULTSDIR)/configuration-remote.toml
	test -e /etc/podvisor/peer-pods-cm.env || install -D -m 0600 configs/peer-pods-cm.env /etc/podvisor/peer-pods-cm.env
	install -D -m 0644 configs/configuration-qemu.toml $(DEFAULTSDIR)/configuration.toml
	install -d $(SHAREDIR)
	cp -L $(GUEST_DIR)/vmlinux.container $(GUEST_DIR)/vmlinuz.container $(GUEST_DIR)/kata-containers-initrd.img $(SHAREDIR)/

clean:
	$(CARGO) clean
	rm -rf build
