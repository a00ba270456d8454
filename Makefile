# thinblk: `make test` and `make demo` are the whole set-up on a new Debian 12
# machine: they install missing packages, Go modules and the guest kernel.
# Everything built or run lands under _build/ (git-ignored).

GO        ?= go
BUILD     := $(CURDIR)/_build
BIN       := $(BUILD)/bin
IMAGES    := $(BUILD)/images
GOTEST_TIMEOUT ?= 40m
# Extra arguments for the benchmark command, e.g. BENCH_ARGS="--duration 5s".
BENCH_ARGS ?=

VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

export THINBLK_BUILD := $(BUILD)

.PHONY: all build deps modules images test unit-test guest-test lint bench demo clean

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

bench: deps build
	$(BIN)/thinblk-bench --thinblk $(BIN)/thinblk --dir $(BUILD)/bench $(BENCH_ARGS)

demo: deps images
	$(GO) run ./guesttests/cmd/demo --build $(BUILD)

clean:
	rm -rf $(BUILD)
