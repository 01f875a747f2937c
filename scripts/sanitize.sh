#!/usr/bin/env bash
# Memory-safety check of the crate's `unsafe` code (SIMD kernels in src/simd/, the BLAS calls
# and the OpenBLAS kernel switch in src/gemm.rs). No Miri here, so:
#  1. every integration test under AddressSanitizer (nightly), with the system OpenBLAS and
#     with the pure-Rust fallback. OpenBLAS itself is not instrumented: ASan sees the Rust
#     side of each call (buffers we hand it) but not OpenBLAS's own reads and writes.
#  2. valgrind memcheck on the test binaries that reach the unsafe blocks (ordinary build),
#     which does see inside OpenBLAS. This machine has AVX2 (no AVX-512), which valgrind
#     emulates; the tests report which SIMD level ran.
# Not part of .ci/run (slow: a full ASan rebuild). Usage: scripts/sanitize.sh [asan|valgrind]
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS=1
what="${1:-all}"
host=x86_64-unknown-linux-gnu

if [[ $what == all || $what == asan ]]; then
  for blas in openblas none; do
    echo "=== AddressSanitizer, cargo test --tests (NDLORA_BLAS=$blas)"
    NDLORA_BLAS=$blas RUSTFLAGS=-Zsanitizer=address RUSTDOCFLAGS=-Zsanitizer=address \
      ASAN_OPTIONS=detect_leaks=1 \
      cargo +nightly test --target "$host" --tests
  done
fi

if [[ $what == all || $what == valgrind ]]; then
  echo "=== valgrind memcheck on the test binaries that reach unsafe code"
  bins=$(cargo test --no-run --tests --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
  # `ndlora` is the library's unit-test binary (the SIMD kernels at every width).
  for t in ndlora micro merge_kernel openblas_kernel blas_path layer bias backward model peft fuzz_replay; do
    bin=$(grep "/$t-[0-9a-f]*$" <<<"$bins" | head -n1)
    echo "--- $t ($bin)"
    valgrind -q --error-exitcode=1 --leak-check=no "$bin" --test-threads=1 -q
  done
fi
