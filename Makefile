# vmhistory — see README.md.
GO      ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
BIN     := bin/vmhistory
# -race multiplies memory and time; the suite is sized for 2 cores in CI.
# -count=1: the services are real, so a cached pass proves nothing about this machine.
TESTFLAGS ?= -race -count=1 -timeout 40m
# pipefail: a failing go test fails the recipe even through testlog.
SHELL := /bin/bash

.PHONY: all build test test-setup fuzz lint vet fmt demo man install clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/vmhistory

## test: install and start the test services if needed, then vet and test everything.
## The log names every test that passed, so a CI log proves what ran; failed
## and skipped tests show their whole output.
## Fuzzing comes first so that the log closes on the tests' count.
test: test-setup vet
	GO=$(GO) scripts/fuzz.sh
	set -o pipefail; $(GO) test $(TESTFLAGS) -json ./... | $(GO) run ./scripts/testlog

## fuzz: every fuzz target for FUZZTIME (30s) each, seeds from testdata/fuzz.
fuzz:
	GO=$(GO) scripts/fuzz.sh

test-setup:
	scripts/setup-test-env.sh

vet:
	$(GO) vet ./...

lint: vet
	@out="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))"; \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

fmt:
	gofmt -w $$(git ls-files '*.go')

## demo: the main job on an embedded default (throwaway pools, test-driver VMs, local kopia repo).
demo: build
	scripts/demo.sh

## man: manual pages generated from the --help text, into bin/man.
man: build
	mkdir -p bin/man && $(BIN) man bin/man

install: build man
	install -D -m 0755 $(BIN) $(DESTDIR)/usr/local/bin/vmhistory
	install -d $(DESTDIR)/usr/local/share/man/man1
	install -m 0644 bin/man/*.1 $(DESTDIR)/usr/local/share/man/man1/

clean:
	rm -rf bin
