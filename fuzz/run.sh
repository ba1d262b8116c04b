#!/usr/bin/env bash
# Run every fuzz target of lora_convert for SECONDS in total (split evenly between them).
#
#   fuzz/run.sh 600          # 10 minutes: st, adapter, container, spec for 150 s each
#
# Uses atheris (coverage-guided libFuzzer) when it is installed, else a plain mutation loop.
# Findings go to fuzz/artifacts/ (crash-*, oom-*, slow-unit-*; last-input-* is the input that
# was running when the per-input watchdog killed a hang). The corpus grows in fuzz/corpus/.
# Exit status 1 when anything was found.
set -u
total=${1:?usage: fuzz/run.sh SECONDS}
cd "$(dirname "$0")/.."
targets="st adapter container spec"
per=$(( total / 4 )); [ "$per" -lt 5 ] && per=5
mkdir -p fuzz/corpus fuzz/artifacts
rm -rf fuzz/seeds && python fuzz/fuzz_readers.py --seeds fuzz/seeds || exit 2
export OMP_NUM_THREADS=1 FUZZ_ARTIFACTS=fuzz/artifacts
status=0
for t in $targets; do
  echo "=== $t: ${per}s"
  if python -c "import atheris" 2>/dev/null; then
    mkdir -p "fuzz/corpus/$t"
    python fuzz/fuzz_readers.py "$t" -max_total_time="$per" -timeout=0 -rss_limit_mb=4096 -max_len=131072 \
      -artifact_prefix="fuzz/artifacts/$t-" -print_final_stats=1 "fuzz/corpus/$t" "fuzz/seeds/$t" 2>&1 \
      | grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' || true
    rc=${PIPESTATUS[0]}
  else
    python fuzz/fuzz_readers.py --plain "$t" "$per" "fuzz/seeds/$t"
    rc=$?
  fi
  if [ "$rc" -ne 0 ]; then
    echo "=== $t: FOUND SOMETHING (exit $rc); see fuzz/artifacts/"
    status=1
  fi
done
exit $status
