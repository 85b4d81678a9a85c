# ublksnap: make demo runs the main job, make test runs the tests.
# Targets that need a ublk kernel boot one in qemu (test/vm/run) when the
# host has none; test/vm/run installs what it needs or says what is missing.

GO         ?= go
VERSION    ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
VM         := test/vm/run
VM_TIMEOUT ?= 2700
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
# KERNELS are the kernel lines the VM suite runs on, one boot each.
KERNELS    ?= 6.12 7
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build test test-unit test-vm bench bench-direct bench-cow bench-backup demo lint clean

all: build

## build: the static binary bin/ublksnap
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o bin/ublksnap ./cmd/ublksnap

## test: unit tests on the host under -race, then the suite on a real ublk kernel
test: test-unit test-vm

## test-unit: host tests, race detector on, then a fixed number of runs of each fuzzer
## (a count, not -fuzztime 10s: a wall-clock budget fails at random on a busy
## machine with "context deadline exceeded", golang/go#75804, unfixed in go1.26)
test-unit:
	$(GO) test -race -count=1 -timeout 20m ./...
	$(GO) -C bench/report test -count=1 ./...
	$(GO) test -run '^$$' -fuzz FuzzConnection -fuzztime 600000x ./nbd
	$(GO) test -run '^$$' -fuzz FuzzLoad -fuzztime 300000x ./cbt
	$(GO) test -run '^$$' -fuzz FuzzManifest -fuzztime 15000x ./backup
	$(GO) test -run '^$$' -fuzz FuzzStateFile -fuzztime 15000x ./snapshot
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime 100000x ./internal/devconf

## test-vm: the harness's own tests on the host, then the integration suite in one VM boot per kernel line
test-vm: build
	$(GO) test -count=1 -tags vmtest -timeout 10m ./test/vm/
	CGO_ENABLED=0 $(GO) test -c -tags vmtest -o bin/integration.test ./test/integration
	@failed=; summary=; for k in $(KERNELS); do \
		kv=$$($(VM) --kernel $$k --print-kernel) || kv="$$k (kernel not available)"; \
		echo "=== integration suite on kernel $$kv ==="; start=$$(date +%s); \
		if $(VM) --kernel $$k --timeout $(VM_TIMEOUT) -- bin/integration.test -test.v -test.timeout 40m; then res=PASS; \
		else res=FAIL; failed="$$failed $$k"; fi; \
		summary="$$summary=== kernel $$kv: $$res in $$(($$(date +%s) - start))s ===\n"; \
		echo "=== kernel $$kv: $$res ==="; \
	done; \
	printf "%b" "$$summary"; \
	if [ -n "$$failed" ]; then echo "integration suite failed on kernel line(s):$$failed"; exit 1; fi; \
	echo "integration suite passed on kernel lines: $(KERNELS)"

## bench: host COW engine benchmarks, then one VM boot per kernel line: loop, ublksnap, dm-snapshot, dm-thin
bench: build
	@mkdir -p bench/out bench/results
	$(GO) test -run '^$$' -bench . -benchtime 2x -benchmem ./cow/ ./storage/ | tee bench/out/host.txt
	cp bench/out/host.txt bench/results/host.txt
	@for k in $(KERNELS); do \
		rm -rf bench/out/$$k; \
		$(VM) --kernel $$k --mem 6144 --timeout 5400 --out bench/out/$$k -- env $$(env | grep '^BENCH_') bench/run.sh || exit 1; \
		$(GO) -C bench/report run . -in $(CURDIR)/bench/out/$$k -out $(CURDIR)/bench/results -name $$k || exit 1; \
		for p in bench/out/$$k/profile-*.pb.gz; do \
			[ -e "$$p" ] || continue; n=$${p##*/profile-}; \
			$(GO) tool pprof -top -nodecount 30 "$$p" >bench/results/$$k-profile-$${n%.pb.gz}.txt 2>/dev/null; \
		done; \
	done

## bench-direct: ublksnap over a block device against that block device, and the page cache it leaves, one VM boot per kernel line
## bench-cow: first writes under a snapshot, chunks copied in the kernel or through buffers, against dm-snapshot and dm-thin, one VM boot per kernel line
bench-direct bench-cow: build
	@mkdir -p bench/out bench/results
	@s=$(@:bench-%=%); for k in $(KERNELS); do \
		rm -rf bench/out/$$s-$$k; \
		$(VM) --kernel $$k --mem 6144 --timeout 3600 --out bench/out/$$s-$$k -- env $$(env | grep '^BENCH_') bench/$$s.sh || exit 1; \
		cp bench/out/$$s-$$k/$$s.md bench/results/$$s-$$k.md; \
	done

## bench-backup: full and incremental backup of 1 GiB, restore, and the fio cost of change tracking, one VM boot per kernel line
bench-backup: build
	@mkdir -p bench/out bench/results
	@for k in $(KERNELS); do \
		$(VM) --kernel $$k --mem 6144 --timeout 3600 -- bench/backup.sh >bench/out/backup-$$k.log 2>&1; rc=$$?; \
		grep '^{\|^kernel' bench/out/backup-$$k.log | tee bench/results/backup-$$k.jsonl; \
		[ $$rc = 0 ] || { tail -n 30 bench/out/backup-$$k.log; exit 1; }; \
	done

## demo: attach, snapshot under writes, verify the image (in the VM when the host has no ublk; 6.12, UBLKSNAP_VM_KERNEL=7 for 7.x)
demo: build
	test/demo/run

## lint: gofmt clean, go vet and staticcheck clean, with and without the vmtest tag
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.cache/*')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags vmtest ./...
	$(GO) -C bench/report vet ./...
	$(GO) run $(STATICCHECK) ./...
	$(GO) run $(STATICCHECK) -tags vmtest ./...

clean:
	rm -rf bin bench/out
