# stockpipe - one hand-written Makefile (see README.md "Building").
#
#   make              build bin/producer bin/consumer bin/reaper
#   make sanitize     the same with ASan+UBSan into bin/asan/
#   make test         install what is missing, unit tests, start the local stack, integration tests
#                     (plain and sanitized builds), stop the stack; prints "N passed, N failed"
#   make test-redis-cluster  the integration suites that talk to Redis (C, the producer's Python
#                     suites, the demo) on a private stack whose Redis is a Redis Cluster of six
#                     (STACK_REDIS_CLUSTER=1; tests/e2e/redis_cluster_suites.sh, ~3.5 min; part of
#                     make test), and the reaper's suite on a cluster of its own (4-5 min more,
#                     not in make test)
#   make demo         the flash-sale demo (see README); STACK_REDIS_CLUSTER=1 runs it on a stack
#                     whose Redis is a Redis Cluster
#   make chaos        the chaos suite: sales under injected faults, each audited (SEED=N replays)
#   make chaos-cluster  its cases on three Kafka brokers, a PostgreSQL standby and a Redis Cluster
#                     (part of chaos), after the checks of the stack's Kafka and Redis cluster modes
#   make bench        benchmarks: the event codec, then the producer under HTTP load on the local
#                     stack (bench/producer_bench.sh; starts and stops the stack if it is not up),
#                     one hot SKU over 1, 2, 3 shards on a private Redis Cluster stack
#                     (bench/shards_bench.sh), the consumer, last the recovery after Redis lost its
#                     data (bench-recovery)
#   make bench-recovery  the recovery bench alone (bench/recovery.py, on a private stack of its
#                     own): FLUSHALL mid-sale, catalogs of 100, 1,000, 10,000 SKUs;
#                     RECOVERY_ARGS="--sizes 300 --restart ..." picks others (--help lists them)
#   make stack-up / stack-down / stack-clean / stack-status   the local Redis, PostgreSQL, Kafka
#   make format       clang-format the C sources (FORMAT_SRC) in the style of .clang-format;
#                     tests/checks/format.sh (part of make test) fails if it would change a line
#   make fuzz         the libFuzzer targets of tests/fuzz/ (clang), FUZZ_SECONDS (60) each; a
#                     20 s run of each is part of make test
#   make deploy-check the container image's build stage (on the host, no engine) and the Kubernetes
#                     manifests of deploy/k8s, validated offline (also part of make test)

VERSION := 0.1.0
ifeq ($(origin CC),default)
  CC := gcc
endif
# The workers' libraries, by pkg-config module, and the Debian package that brings each. The flags
# are asked for when a recipe first needs them, never while make reads this file: on a fresh
# machine `make demo` reads it before `deps` has installed anything (the flags came out empty and
# the first compile failed). A module pkg-config cannot find stops the build with a sentence
# naming its package. cmocka (the tests' only) is asked for apart, so that a build of the workers
# alone (the container image's build stage) does not need it.
PKGS    := rdkafka hiredis jansson libevent libpq
DEB_rdkafka := librdkafka-dev
DEB_hiredis := libhiredis-dev
DEB_jansson := libjansson-dev
DEB_libevent := libevent-dev
DEB_libpq   := libpq-dev
DEB_cmocka  := libcmocka-dev
# $(call pkg_config,--cflags|--libs,MODULES): the flags, or a stop naming the first missing package.
pkg_config = $(foreach m,$(2),$(if $(shell pkg-config --exists $(m) 2>/dev/null && echo y),,\
    $(error pkg-config cannot find '$(m)': install the Debian package $(DEB_$(m)) (make deps \
    installs everything stockpipe needs))))$(shell pkg-config $(1) $(2))
# Each is computed once, on first use (the eval replaces the variable with its value).
PKG_CFLAGS   = $(eval PKG_CFLAGS := $(call pkg_config,--cflags,$(PKGS)))$(PKG_CFLAGS)
PKG_LIBS     = $(eval PKG_LIBS := $(call pkg_config,--libs,$(PKGS)))$(PKG_LIBS)
CMOCKA_CFLAGS = $(eval CMOCKA_CFLAGS := $(call pkg_config,--cflags,cmocka))$(CMOCKA_CFLAGS)
CMOCKA_LIBS  = $(eval CMOCKA_LIBS := $(call pkg_config,--libs,cmocka))$(CMOCKA_LIBS)

WARN    := -Wall -Wextra -Werror -Wstrict-prototypes -Wwrite-strings -Wshadow -Wformat=2
CFLAGS  ?= -O2 -g
ALL_CFLAGS = -std=c17 $(WARN) $(CFLAGS) -D_GNU_SOURCE -DSP_VERSION='"$(VERSION)"' \
             -MMD -MP -iquote common $(PKG_CFLAGS)
LDLIBS   = $(PKG_LIBS) -lpthread

# SAN=1 builds everything with AddressSanitizer + UndefinedBehaviorSanitizer, in its own tree.
ifeq ($(SAN),1)
  CFLAGS   = -O1 -g -fno-omit-frame-pointer
  SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined
  OBJ      := build/asan
  BIN      := bin/asan
else
  SANFLAGS :=
  OBJ      := build/release
  BIN      := bin
endif

# common/ is what two or more workers use (libstockpipe.a); each worker's directory holds its
# main.c and the modules only it uses (lib<worker>.a). A worker's sources find their own headers
# beside them and the shared ones through -iquote common; a common module never includes a
# worker's header.
COMMON_SRC := $(wildcard common/*.c)
LUA_SRC    := $(sort $(wildcard common/lua/*.lua))
COMMON_OBJ := $(COMMON_SRC:%.c=$(OBJ)/%.o) $(OBJ)/gen/lua_scripts.o
LIB        := $(OBJ)/libstockpipe.a
WORKERS    := producer consumer reaper
WORKER_LIBS := $(WORKERS:%=$(OBJ)/lib%.a)
worker_objs = $(patsubst %.c,$(OBJ)/%.o,$(filter-out $(1)/main.c,$(wildcard $(1)/*.c)))
# Tests live by what they test: tests/common/, tests/producer/, tests/consumer/, tests/reaper/;
# unit_*.c need no server, integration_*.c (and integration_*.sh) run against the local stack.
TEST_AREAS := common $(WORKERS)
UNIT_TESTS := $(patsubst %.c,$(OBJ)/%,$(wildcard $(TEST_AREAS:%=tests/%/unit_*.c)))
INT_TESTS  := $(patsubst %.c,$(OBJ)/%,$(wildcard $(TEST_AREAS:%=tests/%/integration_*.c)))
BENCHES    := $(patsubst bench/%.c,$(OBJ)/bench/%,$(wildcard bench/bench_*.c))

.PHONY: all sanitize tests test test-unit test-integration bench bench-recovery demo chaos chaos-cluster test-pg-failover \
        test-redis-cluster deps \
        clean format stack-up stack-down stack-clean stack-status

all: $(WORKERS:%=$(BIN)/%)

sanitize:
	$(MAKE) SAN=1 all tests

tests: $(UNIT_TESTS) $(INT_TESTS) $(BENCHES) $(BIN)/test/producer

$(OBJ)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(SANFLAGS) -c $< -o $@

# The Lua scripts stay readable files in common/lua/ and are embedded as C arrays.
$(OBJ)/gen/lua_scripts.c: $(LUA_SRC) scripts/embed-lua.sh
	@mkdir -p $(dir $@)
	scripts/embed-lua.sh $@ $(LUA_SRC)

$(OBJ)/gen/lua_scripts.o: $(OBJ)/gen/lua_scripts.c
	$(CC) $(ALL_CFLAGS) $(SANFLAGS) -c $< -o $@

$(LIB): $(COMMON_OBJ)
$(OBJ)/libproducer.a: $(call worker_objs,producer)
$(OBJ)/libconsumer.a: $(call worker_objs,consumer)
$(OBJ)/libreaper.a: $(call worker_objs,reaper)
$(LIB) $(WORKER_LIBS):
	@rm -f $@
	ar rcs $@ $^

$(BIN)/%: $(OBJ)/%/main.o $(OBJ)/lib%.a $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) $^ $(LDLIBS) -o $@

# The test build of the producer: order_api.c with -DSP_TEST_FAULTS, which honours fault points
# set by the environment (SP_FAULT_*; see producer/order_api.c). Only tests run it.
$(OBJ)/faults/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(SANFLAGS) -DSP_TEST_FAULTS -c $< -o $@

$(BIN)/test/producer: $(OBJ)/producer/main.o $(OBJ)/faults/producer/order_api.o \
                      $(OBJ)/libproducer.a $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) $^ $(LDLIBS) -o $@

# Only the tests include cmocka; a test may include any worker's headers and tests/lib/itest.h.
$(OBJ)/tests/%.o: ALL_CFLAGS += $(CMOCKA_CFLAGS) -iquote tests/lib $(WORKERS:%=-iquote %)

$(UNIT_TESTS) $(INT_TESTS): $(OBJ)/%: $(OBJ)/%.o $(WORKER_LIBS) $(LIB)
	$(CC) $(SANFLAGS) $^ $(LDLIBS) $(CMOCKA_LIBS) -o $@

$(OBJ)/bench/%: $(OBJ)/bench/%.o $(LIB)
	$(CC) $(SANFLAGS) $< $(LIB) $(LDLIBS) -o $@

# Fuzz targets (tests/fuzz/fuzz_*.c): libFuzzer with Debian's clang, on the pure parsers only
# (api_request.c, event.c: no libevent, Redis or Kafka), into build/fuzz/. The ordinary build
# also links each target with tests/fuzz/replay.c (gcc, ASan under SAN=1), which runs the kept
# corpus and regression inputs once each without libFuzzer.
FUZZ_CC      := clang-14
FUZZ_SECONDS ?= 60
FUZZ_NAMES   := $(patsubst tests/fuzz/%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_SRC     := producer/api_request.c common/event.c
FUZZ_FLAGS   := -std=c17 $(WARN) -g -O1 -fno-omit-frame-pointer -D_GNU_SOURCE -iquote common \
                -iquote producer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined

.PHONY: fuzz fuzz-targets
fuzz-targets: $(FUZZ_NAMES:%=build/fuzz/%)

build/fuzz/%: tests/fuzz/%.c $(FUZZ_SRC) $(wildcard common/*.h producer/*.h)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) $(call pkg_config,--cflags,jansson) $< $(FUZZ_SRC) \
	    $(call pkg_config,--libs,jansson) -o $@

tests: $(FUZZ_NAMES:%=$(OBJ)/fuzz/%)

$(OBJ)/fuzz/%: $(OBJ)/tests/fuzz/%.o $(OBJ)/tests/fuzz/replay.o $(OBJ)/libproducer.a $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) $^ $(LDLIBS) -o $@

fuzz: deps
	@$(MAKE) --no-print-directory fuzz-targets
	@$(MAKE) --no-print-directory SAN=1 $(FUZZ_NAMES:%=build/asan/fuzz/%)
	@FUZZ_SECONDS=$(FUZZ_SECONDS) tests/fuzz/run.sh

# Installs missing packages and the Kafka jars; a no-op when everything is there. Every target
# that depends on it builds in a new make run after it ($(MAKE) ...), so that the flags are read
# from packages that are there by then.
deps:
	@scripts/install-deps.sh

# tests/deploy/*.sh alone: deploy/Dockerfile's build stage done on the host and checked with ldd
# against its runtime stage, and deploy/k8s rendered by kustomize and validated offline.
.PHONY: deploy-check
deploy-check: deps
	@rc=0; for s in tests/deploy/*.sh; do bash "$$s" || rc=1; done; exit $$rc

# Unit tests: no servers needed.
test-unit: all tests
	@tests/run-all.sh --unit-only

# The whole suite, plain and sanitized; starts the local stack if it is not running and stops it
# again afterwards (a stack that was already up is left up).
test: deps
	@$(MAKE) --no-print-directory all tests
	@$(MAKE) --no-print-directory SAN=1 all tests
	@$(MAKE) --no-print-directory fuzz-targets
	@tests/run-all.sh

# The codec benchmarks, then the producer under wrk against the local stack (bench/run.sh), one hot
# SKU over 1, 2, 3 shards on a private Redis Cluster stack of its own (bench/shards_bench.sh), the
# consumer, and last the recovery bench with its default sizes (about two minutes).
bench: deps
	@$(MAKE) --no-print-directory all tests
	@bench/run.sh $(BENCHES)
	@echo "=== shards_bench"
	@bench/shards_bench.sh
	@bench/consumer_bench.sh
	@python3 bench/recovery.py

# After Redis lost its data: how long until every open sale is back, and what buyers heard
# meanwhile, by catalog size (issue 20), on a private stack of its own (bench/recovery.py).
bench-recovery: deps
	@$(MAKE) --no-print-directory all
	@python3 bench/recovery.py $(RECOVERY_ARGS)

demo: deps
	@$(MAKE) --no-print-directory all
	@scripts/demo.sh

# Flash sales under kill -9 of workers, Kafka and PostgreSQL restarts and a Redis failover that
# loses writes, on a private stack of its own; every fault kind with a long sale. SEED=N replays
# the random choices of an earlier run (its seed is printed first and last).
chaos: deps
	@$(MAKE) --no-print-directory all
	@tests/chaos/chaos.sh $(if $(SEED),--seed $(SEED))
	@$(MAKE) --no-print-directory chaos-cluster

# The cluster cases alone (after the checks of the cluster stack itself, tests/chaos/stack_cluster.sh
# for three Kafka brokers and tests/chaos/stack_redis_cluster.sh for a Redis Cluster of six):
# three Kafka brokers (RF 3, min.insync.replicas=2), a PostgreSQL primary with a synchronous
# standby and a Redis Cluster of six; a broker leader killed, a broker's disk lost, two brokers
# down, the primary of the sale's Redis slot cut off from its replica and killed (its replica
# promoted), the sale's slot resharded to another primary mid-sale, the PostgreSQL primary killed
# and its standby promoted (tests/chaos/chaos.py --cluster).
chaos-cluster: deps
	@$(MAKE) --no-print-directory all
	@tests/chaos/stack_cluster.sh
	@tests/chaos/stack_redis_cluster.sh
	@tests/chaos/chaos.sh --cluster $(if $(SEED),--seed $(SEED))

# The PostgreSQL failover alone (part of make test): a private stack with a synchronous standby,
# the primary killed with -9 mid-sale, the standby promoted (tests/e2e/pg_failover.sh).
test-pg-failover: deps
	@$(MAKE) --no-print-directory all
	@tests/e2e/pg_failover.sh

# The integration suites that talk to Redis, against a Redis Cluster (part of make test): a private
# stack with STACK_REDIS_CLUSTER=1 (ports 22379.., 22432, 22092), the C suites, integration_workers,
# the producer's Python suites and the demo on it (tests/e2e/redis_cluster_suites.sh).
test-redis-cluster: deps
	@$(MAKE) --no-print-directory all tests
	@tests/e2e/redis_cluster_suites.sh --with-reaper

stack-up: deps
	@scripts/stack.sh up

stack-down:
	@scripts/stack.sh down

stack-clean:
	@scripts/stack.sh down --purge

stack-status:
	@scripts/stack.sh status

# The C sources `make format` rewrites and tests/checks/format.sh checks (clang-format 14).
FORMAT_SRC = $(sort $(wildcard common/*.[ch] producer/*.[ch] consumer/*.[ch] reaper/*.[ch] \
                 tests/*/*.[ch] bench/*.c))
format:
	clang-format -i --style=file $(FORMAT_SRC)

clean:
	rm -rf build bin

# Keep objects make would otherwise delete as intermediates.
.SECONDARY:

-include $(shell find build -name '*.d' 2>/dev/null)
