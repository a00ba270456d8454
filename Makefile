# thinblk: `make test` and `make demo` are the whole set-up on a new Debian 12
# machine: they install missing packages, Go modules and the guest kernel.
# Everything built or run lands under _build/ (git-ignored).

GO        ?= go
BUILD     := $(CURDIR)/_build
BIN       := $(BUILD)/bin
IMAGES    := $(BUILD)/images
GOTEST_TIMEOUT ?= 40m
# Extra arguments for the benchmark command, e.g. BENCH_ARGS="--duration 5s". The chart of
# the run goes to _build/bench/bench.svg.
BENCH_ARGS ?=

VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

export THINBLK_BUILD := $(BUILD)

# make install [PREFIX=/usr/local] [DESTDIR=]: the binaries and the systemd unit.
PREFIX    ?= /usr/local
DESTDIR   ?=
BINDIR    ?= $(PREFIX)/bin
UNITDIR   ?= $(PREFIX)/lib/systemd/system

.PHONY: all build deps modules images test lint bench demo xfstests install clean soak-restart soak-restart-qsd soak-upgrade faults-long

all: build

deps:
	bash scripts/install-deps.sh

modules:
	$(GO) mod download

build: modules
	mkdir -p $(BIN)
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/ ./cmd/...

images: deps build
	bash images/build.sh $(IMAGES)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# Unit, integration (qemu-storage-daemon and thinblk through the Go
# front-end) and guest tests (real QEMU VMs). Set THINBLK_SKIP_VM=1 to opt out
# of the VM tests explicitly.
test: deps images lint
	$(GO) test -count=1 -timeout $(GOTEST_TIMEOUT) ./...

# Soak: `thinblk serve` SIGKILLed KILLS times (and restarted) under a guest running verified
# fio; the last line says kills survived, guest errors, fio runs verified and the longest stall.
KILLS ?= 100
soak-restart: deps images
	THINBLK_SOAK_KILLS=$(KILLS) $(GO) test -count=1 -timeout 90m -run 'TestGuestServeKilled/fio' -v ./guesttests

# The same soak against qemu-storage-daemon (no in-flight tracking), for comparison.
soak-restart-qsd: deps images
	THINBLK_SOAK_QSD_KILLS=$(KILLS) $(GO) test -count=1 -timeout 90m -run 'TestGuestQSDKilledSoak' -v ./guesttests

# Upgrades under a guest's verified fio: UPGRADES plain restarts of serve (QEMU reconnects), then
# UPGRADES hand-overs (--handover-from, no reconnect); each prints the guest-visible stalls.
UPGRADES ?= 20
soak-upgrade: deps images
	THINBLK_SOAK_UPGRADES=$(UPGRADES) $(GO) test -count=1 -timeout 90m -run 'TestGuestServeKilled/(upgrade|handover)' -v ./guesttests

# The fault-injecting model tests of the thin pool, long: FAULT_SEEDS seeds from FAULT_SEED of
# FAULT_STEPS steps (empty: each test's default) for each of the three (scripts/faults-long.sh).
FAULT_SEEDS ?= 500
FAULT_SEED  ?= 1
FAULT_STEPS ?=
faults-long: modules
	FAULT_SEEDS=$(FAULT_SEEDS) FAULT_SEED=$(FAULT_SEED) FAULT_STEPS=$(FAULT_STEPS) GO=$(GO) bash scripts/faults-long.sh

bench: deps build
	mkdir -p $(BUILD)/bench
	$(BIN)/thinblk-bench --thinblk $(BIN)/thinblk --dir $(BUILD)/bench --svg $(BUILD)/bench/bench.svg $(BENCH_ARGS)

demo: deps images
	$(GO) run ./guesttests/cmd/demo --build $(BUILD)

# xfstests in guests on thinblk disks, side by side with qemu-storage-daemon. XFSTESTS_DIR is a
# built upstream xfstests tree (not shipped or built here).
XFSTESTS_DIR ?=
FSTYP   ?= xfs
TESTS   ?=
GROUP   ?=
BACKEND ?= both
REPEAT  ?= 1
XFSTESTS_ARGS ?=
xfstests: deps build
	@test -n "$(XFSTESTS_DIR)" || { echo "usage: make xfstests XFSTESTS_DIR=DIR [FSTYP=xfs|ext4] [TESTS=\"generic/001 xfs/011\" | GROUP=quick] [BACKEND=thinblk|qsd|both] [REPEAT=N]"; exit 2; }
	$(BIN)/thinblk-xfstests --install-packages --xfstests $(XFSTESTS_DIR) --fstyp $(FSTYP) \
		$(if $(TESTS),--tests "$(TESTS)") $(if $(GROUP),--group $(GROUP)) \
		--backend $(BACKEND) --repeat $(REPEAT) --thinblk $(BIN)/thinblk $(XFSTESTS_ARGS)

# thinblk-agent runs inside test guests and thinblk-xfstests needs this checkout: not installed.
install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR)
	install -m 0755 $(BIN)/thinblk $(BIN)/thinblk-bench $(DESTDIR)$(BINDIR)/
	sed 's|@BINDIR@|$(BINDIR)|g' systemd/thinblk-serve@.service.in > $(DESTDIR)$(UNITDIR)/thinblk-serve@.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/thinblk-serve@.service

clean:
	rm -rf $(BUILD)
