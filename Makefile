# Fulcrum's two entry points: `make build` (the binary) and `make test` (every
# check CI runs). Both install what they need themselves.

CARGO ?= cargo

.PHONY: build test lint unit doc fuzz docs manifests-check manifests demo crds bench bench-balance bench-h1 bench-hpack bench-codec bench-proxy bench-instructions bench-operator bench-discovery kind-deploy image clean

# The manifest checks' tools (Helm's Go SDK, kubernetes-validate, checkov) live
# in a virtualenv in the repository, reinstalled when their pinned list changes.
VENV := .venv
PY := $(VENV)/bin/python
REQS := tests/manifests/requirements.txt
STAMP := $(VENV)/.installed-$(shell cksum $(REQS) | cut -d' ' -f1)

build:
	$(CARGO) build --release --locked

## Every check: formatting, lints, unit/property/integration tests (the local
## end-to-end test included), doc tests, and the chart and manifest checks.
test: lint doc unit manifests-check

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

## The install test (tests/install) renders the chart with its CI values through
## the same tools, so the unit tests need the virtualenv too, and a kubectl
## client (the machine's, or one installed into the virtualenv).
unit: $(STAMP)
	bash tests/install/kubectl.sh $(VENV)
	@export PATH="$$PATH:$(CURDIR)/$(VENV)/bin"; if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --no-fail-fast; \
	else \
		echo "cargo-nextest not found: running cargo test"; \
		$(CARGO) test --locked --no-fail-fast --lib --bins --tests; \
	fi

doc:
	$(CARGO) test --locked --doc

## Fuzzing: every target of tests/fuzz for 100 000 cases each (make test runs 256).
fuzz:
	PROPTEST_CASES=100000 $(CARGO) test --locked --test fuzz

## Regenerate docs/crd.md, the LoadBalancedApp field reference, from the CRD's schema (a test fails when it drifts).
docs:
	FULCRUM_WRITE_DOCS=1 $(CARGO) test --locked --test api -- the_crd_reference_in_docs_matches_the_schema

## Regenerate the checked-in CRD from the types in src/api/ (a test fails when they drift).
crds:
	$(CARGO) run --locked --quiet -- crd > crds/loadbalancedapps.fulcrum.dev.yaml
	cp crds/loadbalancedapps.fulcrum.dev.yaml charts/fulcrum/crds/

$(STAMP): $(REQS)
	@python3 -m venv $(VENV) 2>/dev/null || { \
		echo "python3 -m venv failed: installing python3-venv"; \
		apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv $(VENV); }
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $(REQS)
	@rm -f $(VENV)/.installed-*
	@touch $@

## Chart lint and render (real Helm), Kubernetes schema validation, CRD schema
## validation of the examples, checkov, and drift of manifests/install.yaml.
manifests-check: $(STAMP)
	bash tests/install/promtool.sh
	$(PY) tests/manifests/check.py

## Regenerate manifests/install.yaml from the chart.
manifests: $(STAMP)
	bash tests/install/promtool.sh
	$(PY) tests/manifests/check.py --write

## The container image (needs Docker).
IMAGE ?= fulcrum:dev
image:
	docker build -t $(IMAGE) .

## The quickstart on kind (needs Docker and kind): a cluster, the image, the chart, an example.
kind-deploy:
	bash tests/e2e/kind.sh deploy

## See the proxy work in about ten seconds (no cluster, loopback only).
demo:
	@echo "building fulcrum with the quick profile (a few minutes on a fresh clone; cargo shows its progress)..."
	$(CARGO) build --locked --profile quick
	./target/quick/fulcrum demo

## All benchmarks (not part of `make test`): the balancing core, then the proxy
## against HAProxy and NGINX. Writes bench/results/ and bench/RESULTS.md.
bench: bench-balance bench-h1 bench-hpack bench-codec bench-proxy bench-operator bench-discovery bench-zones

## Balancing-core benchmark; writes bench/results/balance.md.
bench-balance:
	$(CARGO) bench --locked --bench balance
	python3 bench/balance_table.py target/criterion > bench/results/balance.md
	@cat bench/results/balance.md

## The HTTP/1.1 fast path's head parsing and rewriting, without I/O (criterion).
bench-h1:
	$(CARGO) bench --locked --bench h1

## HPACK decoding and encoding per message, beside loona-hpack (criterion).
bench-hpack:
	$(CARGO) bench --locked --bench hpack

## The HTTP/2 layer alone: the proxy's codec against the h2 crate under h2load
## (installs h2load with the proxy benchmark's tools when missing).
bench-codec:
	$(CARGO) build --release --locked --example h2_codec
	bash bench/proxy/install.sh
	python3 bench/proxy/codec.py

## Proxy benchmarks: fulcrum vs HAProxy vs NGINX on loopback; installs wrk,
## haproxy and nginx from Debian's packages when missing.
bench-proxy: build
	$(CARGO) build --release --locked --example bench_peer
	bash bench/proxy/install.sh
	python3 bench/proxy/run.py --fulcrum target/release/fulcrum --peer target/release/examples/bench_peer --out bench/RESULTS.md --raw bench/results/proxy-raw.log
	@cat bench/RESULTS.md

## Instructions per proxied request under callgrind (HTTP/1.1, HTTP/2 clients,
## gRPC), HAProxy's beside: repeatable to 0.2-1.5% on an idle machine, for judging a change before the load
## rounds of bench-proxy. `make bench-instructions BASE=path/to/other/fulcrum`
## compares against another build.
bench-instructions: build
	$(CARGO) build --release --locked --example bench_peer
	bash bench/proxy/install.sh
	python3 bench/proxy/instructions.py haproxy $(BASE) target/release/fulcrum

## Operator at scale: 500 apps on the in-memory API server; the table goes into bench/RESULTS.md.
## Cost of one EndpointSlice change inside the proxy; the table goes into bench/RESULTS.md.
bench-discovery:
	$(CARGO) bench --locked --bench discovery > bench/results/discovery.md
	python3 bench/splice.py bench/RESULTS.md bench/results/discovery.md
	@cat bench/results/discovery.md

## Zone-aware balancing: local share and endpoint load; spliced into bench/RESULTS.md.
bench-zones:
	$(CARGO) bench --locked --bench zones > bench/results/zones.md
	python3 bench/splice.py bench/RESULTS.md bench/results/zones.md
	@cat bench/results/zones.md

bench-operator:
	$(CARGO) bench --locked --bench operator_scale > bench/results/operator.md
	python3 bench/splice.py bench/RESULTS.md bench/results/operator.md
	@cat bench/results/operator.md

clean:
	$(CARGO) clean
