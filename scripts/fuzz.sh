#!/usr/bin/env bash
# Fuzzes every parser that faces untrusted input (fuzz/fuzz_targets: the
# consume body, Stripe-Signature, the embed-key form, bearer tokens, usage
# stream entries, configuration), each for FUZZ_SECONDS (default 30),
# starting from the committed corpora in fuzz/corpus. A crash fails the
# run and leaves its input in fuzz/artifacts/<target>/.
#
# Needs the nightly toolchain (cargo-fuzz builds with sanitizer flags only
# nightly takes); installs cargo-fuzz when it is missing. By default the
# targets build unoptimised without a sanitizer (5 minutes on 2 cores
# rather than 12): enough to find panics in 30 s. For long runs,
# FUZZ_BUILD="-O" builds optimised with AddressSanitizer.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-30}
read -r -a build <<<"${FUZZ_BUILD:--D --sanitizer none}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz build "${build[@]}"
for target in $(cargo +nightly fuzz list); do
  # New inputs go to a scratch copy: the committed corpus changes only
  # when someone minimises it on purpose (cargo fuzz cmin).
  scratch=$(mktemp -d)
  cp -r "corpus/$target/." "$scratch/"
  log="$scratch.log"
  echo "fuzz: $target for ${seconds}s"
  if ! cargo +nightly fuzz run "${build[@]}" "$target" "$scratch" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "fuzz: $target failed; its input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units)' "$log" || true
  rm -rf "$scratch" "$log"
done
