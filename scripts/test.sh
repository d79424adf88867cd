#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what the tests need, then runs
# every test of the workspace (unit, FUSE mounts, umoci references). Tests that need root,
# /dev/fuse or umoci fail (not skip) when CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo fmt --all -- --check
# (`cargo clippy --workspace --all-targets -- -D warnings` is kept clean by every change; it is
# not repeated here to keep CI within its time on 2 cores.)
cargo test --workspace --no-fail-fast
