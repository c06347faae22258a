# Fulcrum's two entry points: `make build` (the binary) and `make test` (every
# check CI runs). Both install what they need themselves.

CARGO ?= cargo

.PHONY: build test lint unit doc demo crds bench bench-balance bench-proxy bench-operator clean

build:
	$(CARGO) build --release --locked

## Every check: formatting, lints, unit/property/integration tests, doc tests.
test: lint doc unit

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

unit:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --no-fail-fast; \
	else \
		echo "cargo-nextest not found: running cargo test"; \
		$(CARGO) test --locked --no-fail-fast --lib --bins --tests; \
	fi

doc:
	$(CARGO) test --locked --doc

## Regenerate the checked-in CRD from the types in src/api/ (a test fails when they drift).
crds:
	$(CARGO) run --locked --quiet -- crd > crds/loadbalancedapps.fulcrum.dev.yaml

## See the proxy work in about ten seconds (no cluster, loopback only).
demo: build
	./target/release/fulcrum demo

## All benchmarks (not part of `make test`): the balancing core, then the proxy
## against HAProxy and NGINX. Writes bench/results/ and bench/RESULTS.md.
bench: bench-balance bench-proxy bench-operator

## Balancing-core benchmark; writes bench/results/balance.md.
bench-balance:
	$(CARGO) bench --locked --bench balance
	python3 bench/balance_table.py target/criterion > bench/results/balance.md
	@cat bench/results/balance.md

## Proxy benchmarks: fulcrum vs HAProxy vs NGINX on loopback; installs wrk,
## haproxy and nginx from Debian's packages when missing.
bench-proxy: build
	bash bench/proxy/install.sh
	python3 bench/proxy/run.py --fulcrum target/release/fulcrum --out bench/RESULTS.md
	@cat bench/RESULTS.md

## Operator at scale: 500 apps on the in-memory API server; the table goes into bench/RESULTS.md.
bench-operator:
	$(CARGO) bench --locked --bench operator_scale > bench/results/operator.md
	python3 bench/splice.py bench/RESULTS.md bench/results/operator.md
	@cat bench/results/operator.md

clean:
	$(CARGO) clean
