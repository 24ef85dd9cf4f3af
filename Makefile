# The way in. `make demo` and `make test` set up everything they need on a fresh Debian 12 host.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all build deps demo test unit e2e guest lab clean

all: build

deps:
	@scripts/install-deps.sh all

build: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD_DIR) -j $(JOBS)

guest: deps
	@guest/build.sh $(BUILD_DIR)/guest

lab: deps
	@tests/lab/prepare

demo: build guest lab
	@scripts/demo.sh

test: build guest lab
	@tests/run-all.sh $(BUILD_DIR)

clean:
	rm -rf $(BUILD_DIR)
