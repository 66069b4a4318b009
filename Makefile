SHELL := /bin/bash
# shrink — build, test, benchmark and demo entry points.
#
#   make demo    install what is missing, build, build the images, run the demo
#   make test    everything `make demo` needs, then the whole test suite (CI runs this)
#   make bench   benchmarks; JSON and plots under bench/results/
#
# Everything runs as root on a fresh Debian machine: missing packages are installed here.

CARGO   ?= cargo
PACKAGES := redis-server libpcap-dev libssl-dev pkg-config e2fsprogs debootstrap tcpdump \
            redis-tools qemu-utils qemu-system-x86 iproute2 lz4 util-linux python3 ethtool iputils-ping \
            fonts-dejavu-core socat
RELEASE := target/release

.PHONY: all deps build images test bench demo clean

all: build

# Install the Debian packages that are missing (apt-get update only when needed).
deps:
	@missing=""; for p in $(PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo ">> installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo ">> system packages present"; fi

build: deps
	$(CARGO) build --release --workspace

images: deps
	$(MAKE) -C images all

# The tests run release code with the VMM's test hooks, built in its own profile
# (target/test-hooks/), so that the binaries of `make build` (target/release/) never have them.
TEST_BUILD = --workspace --profile test-hooks --features hypervisor/test-hooks

# Every suite runs even when one fails (--no-fail-fast), then the format and lint gates; the
# exit status is non-zero if any of them failed, and the summary names which.
test: deps images
	@failed=""; mkdir -p target; \
	if $(CARGO) build $(TEST_BUILD); then \
		$(CARGO) test $(TEST_BUILD) --no-fail-fast 2>&1 | tee target/test.log; \
		[ $${PIPESTATUS[0]} -eq 0 ] || failed="$$failed cargo-test"; \
	else failed="$$failed build(test-hooks)"; fi; \
	$(CARGO) fmt --all -- --check || failed="$$failed fmt(workspace)"; \
	(cd images/guest && $(CARGO) fmt -- --check) || failed="$$failed fmt(guest)"; \
	$(CARGO) clippy $(TEST_BUILD) --all-targets -- -D warnings || failed="$$failed clippy(workspace)"; \
	(cd images/guest && $(CARGO) clippy --release -- -D warnings) || failed="$$failed clippy(guest)"; \
	if [ -n "$$failed" ]; then echo ">> make test FAILED:$$failed (cargo test's log: target/test.log)"; exit 1; fi; \
	echo ">> make test: every suite, fmt and clippy passed"

bench: build images
	./bench/run.sh

demo: build images
	./scripts/demo.sh

clean:
	$(CARGO) clean
	$(MAKE) -C images clean
