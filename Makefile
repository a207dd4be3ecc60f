# stockpipe - one hand-written Makefile (see README.md "Building").
#
#   make              build bin/producer bin/consumer bin/reaper
#   make sanitize     the same with ASan+UBSan into bin/asan/
#   make test         install what is missing, unit tests, start the local stack, integration tests
#                     (plain and sanitized builds), stop the stack; prints "N passed, N failed"
#   make demo         the flash-sale demo (see README)
#   make bench        benchmarks: the event codec, then the producer under HTTP load on the local
#                     stack (bench/producer_bench.sh; starts and stops the stack if it is not up)
#   make stack-up / stack-down / stack-clean / stack-status   the local Redis, PostgreSQL, Kafka
#   make format       clang-format the C sources

VERSION := 0.1.0
ifeq ($(origin CC),default)
  CC := gcc
endif
PKGS    := rdkafka hiredis jansson libevent libpq cmocka
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := $(shell pkg-config --libs rdkafka hiredis jansson libevent libpq 2>/dev/null)
CMOCKA_LIBS := $(shell pkg-config --libs cmocka 2>/dev/null)

WARN    := -Wall -Wextra -Werror -Wstrict-prototypes -Wwrite-strings -Wshadow -Wformat=2
CFLAGS  ?= -O2 -g
ALL_CFLAGS = -std=c17 $(WARN) $(CFLAGS) -D_GNU_SOURCE -DSP_VERSION='"$(VERSION)"' \
             -MMD -MP -iquote common $(PKG_CFLAGS)
LDLIBS  := $(PKG_LIBS) -lpthread

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

COMMON_SRC := $(wildcard common/*.c)
LUA_SRC    := $(sort $(wildcard common/lua/*.lua))
COMMON_OBJ := $(COMMON_SRC:%.c=$(OBJ)/%.o) $(OBJ)/gen/lua_scripts.o
LIB        := $(OBJ)/libstockpipe.a
WORKERS    := producer consumer reaper
UNIT_TESTS := $(patsubst tests/unit/%.c,$(OBJ)/tests/%,$(wildcard tests/unit/test_*.c))
INT_TESTS  := $(patsubst tests/integration/%.c,$(OBJ)/tests/%,$(wildcard tests/integration/test_*.c))
BENCHES    := $(patsubst bench/%.c,$(OBJ)/bench/%,$(wildcard bench/bench_*.c))

.PHONY: all sanitize tests test test-unit test-integration bench demo deps clean format \
        stack-up stack-down stack-clean stack-status

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
	@rm -f $@
	ar rcs $@ $^

$(BIN)/%: $(OBJ)/%/main.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) $< $(LIB) $(LDLIBS) -o $@

# The test build of the producer: order_api.c with -DSP_TEST_FAULTS, which honours fault points
# set by the environment (SP_FAULT_*; see common/order_api.c). Only tests run it.
$(OBJ)/faults/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(SANFLAGS) -DSP_TEST_FAULTS -c $< -o $@

$(BIN)/test/producer: $(OBJ)/producer/main.o $(OBJ)/faults/common/order_api.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(SANFLAGS) $^ $(LDLIBS) -o $@

$(OBJ)/tests/%: $(OBJ)/tests/unit/%.o $(LIB)
	$(CC) $(SANFLAGS) $< $(LIB) $(LDLIBS) $(CMOCKA_LIBS) -o $@

$(OBJ)/tests/%: $(OBJ)/tests/integration/%.o $(LIB)
	$(CC) $(SANFLAGS) $< $(LIB) $(LDLIBS) $(CMOCKA_LIBS) -o $@

$(OBJ)/bench/%: $(OBJ)/bench/%.o $(LIB)
	$(CC) $(SANFLAGS) $< $(LIB) $(LDLIBS) -o $@

# Installs missing packages and the Kafka jars; a no-op when everything is there.
deps:
	@scripts/install-deps.sh

# Unit tests: no servers needed.
test-unit: all tests
	@tests/run-all.sh --unit-only

# The whole suite, plain and sanitized; starts the local stack if it is not running and stops it
# again afterwards (a stack that was already up is left up).
test: deps
	@$(MAKE) --no-print-directory all tests
	@$(MAKE) --no-print-directory SAN=1 all tests
	@tests/run-all.sh

# The codec benchmarks, then the producer under wrk against the local stack (bench/run.sh).
bench: deps all tests
	@bench/run.sh $(BENCHES)
	@bench/consumer_bench.sh

demo: deps all
	@scripts/demo.sh

stack-up: deps
	@scripts/stack.sh up

stack-down:
	@scripts/stack.sh down

stack-clean:
	@scripts/stack.sh down --purge

stack-status:
	@scripts/stack.sh status

format:
	clang-format -i common/*.[ch] producer/*.c consumer/*.c reaper/*.c tests/*/*.c bench/*.c

clean:
	rm -rf build bin

# Keep objects make would otherwise delete as intermediates.
.SECONDARY:

-include $(shell find build -name '*.d' 2>/dev/null)
