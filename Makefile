# Fulcrum's two entry points: `make build` (the binary) and `make test` (every
# check CI runs). Both install what they need themselves.

CARGO ?= cargo

.PHONY: build test lint unit doc bench-balance clean

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

## Balancing-core benchmark; writes bench/results/balance.md.
bench-balance:
	$(CARGO) bench --locked --bench balance
	python3 bench/balance_table.py target/criterion > bench/results/balance.md
	@cat bench/results/balance.md

clean:
	$(CARGO) clean
