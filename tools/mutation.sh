#!/usr/bin/env bash
# Mutation testing with mutmut 3 (pin: mutmut==3.8.1, `pip install -e ".[mutation]"`), one module at a time.
#
#   bash tools/mutation.sh MODULE                  # fresh run, then the summary
#   bash tools/mutation.sh MODULE survivors        # list the surviving mutants of the last run
#   bash tools/mutation.sh MODULE show MUTANT      # the diff of one mutant (read-only)
#   bash tools/mutation.sh MODULE check MUTANT [PYTEST ARGS]
#                                                  # re-copy tests/, run them against MUTANT:
#                                                  # a test that kills it fails here
#   bash tools/mutation.sh MODULE recheck [GLOB..] # re-run matching survivors in a fresh
#                                                  # interpreter (import-time code, see below)
#   bash tools/mutation.sh MODULE kinds            # survivors as log / message / other
#                                                  # (tools/mutation_kinds.py)
#   bash tools/mutation.sh MODULE summary          # the counts of the last run again
#
# MODULE: protocol | cpm/bandit.py | cpm/rounds.py | cpm/reputation.py | knexad/outbox.py
#         | cpm/matching.py | knexad/exchange.py
#
# The tree is never mutated: the packages, tests/ and pyproject.toml (tracked files and
# untracked ones git does not ignore) are copied to mutants/<slug>/ (git-ignored), a
# [mutmut] setup.cfg is written there, and mutmut works on its own copy under
# mutants/<slug>/mutants/. Each mutant runs only the selected tests that reach the mutated
# function, with `-x -p no:randomly` (mutmut's own flags); a mutant whose tests use more
# CPU than (their clean time + timeout_constant) * timeout_multiplier * 2 is a "timeout".
#
# Environment: MUTATION_JOBS (parallel mutants, default 2), MUTATION_SAMPLE=N (test only N
# mutants drawn at random, seed MUTATION_SEED, default 14; every mutant is still
# generated), MUTATION_TESTS_REF=<commit> (run the tests as of that commit against the
# current code: the "before" score of new tests), PYTHON (default .venv/bin/python).
# Run it under `nice` on a shared machine.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PYTHON=${PYTHON:-$root/.venv/bin/python}
"$PYTHON" -c "import mutmut" 2>/dev/null || {
  echo "mutmut is not installed in $PYTHON's environment: .venv/bin/pip install -e '.[mutation]'" >&2; exit 2; }
module=${1:?usage: bash tools/mutation.sh MODULE [survivors|show M|check M|summary]}
action=${2:-run}

unit=tests/unit
integ=tests/integration
extra_args=""  # more pytest arguments for every run of this module
case "$module" in
  protocol | protocol/)
    module=protocol
    # test_protocol_purity.py is left out: it imports protocol/ in a subprocess and
    # (rightly) rejects mutmut's trampoline import, so the clean run could never pass.
    tests=$(ls $unit/test_protocol_*.py | grep -v test_protocol_purity.py)
    tests="$tests $unit/test_vectors.py $unit/test_knowledge_frame.py" ;;
  cpm/bandit.py) tests="$unit/test_bandit.py" ;;
  cpm/rounds.py) tests="$unit/test_rounds.py $unit/test_rounds_answers.py" ;;
  cpm/reputation.py) tests="$unit/test_reputation.py $unit/test_poison_quarantine.py $unit/test_poison_safety.py" ;;
  knexad/outbox.py) tests="$unit/test_outbox.py" ;;
  cpm/matching.py) tests="$unit/test_matching.py $unit/test_matching_edges.py" ;;
  knexad/exchange.py)
    tests="$integ/test_exchange.py $integ/test_exchange_record.py $integ/test_knowledge_stream.py
           $integ/test_hostile_exchange.py $integ/test_hostile_knowledge.py $integ/test_hostile_fuzz.py"
    # mutmut's per-mutant limit counts CPU seconds; a mutant that leaves a libp2p stream
    # waiting burns none, so bound each test's wall time too
    extra_args="--timeout=60" ;;
  *) echo "unknown module: $module" >&2; exit 2 ;;
esac
if [ "$module" = protocol ]; then only="protocol/*"; else only="$module"; fi
slug=${module%.py}; slug=${slug//\//_}
[ -z "${MUTATION_TESTS_REF:-}" ] || slug="$slug@$MUTATION_TESTS_REF"
work="$root/mutants/$slug"

summary() {
  (cd "$work" && "$PYTHON" - "$only" <<'EOF'
import fnmatch, json, sys
from collections import Counter
from pathlib import Path
from mutmut.stats import status_by_exit_code
counts, per_file = Counter(), {}
recheck = {}
if Path("recheck.tsv").exists():  # fresh-process verdicts override mutmut's (see recheck)
    for line in Path("recheck.tsv").read_text().splitlines():
        name, verdict, _rc = line.split("\t")
        recheck[name] = verdict
for meta in sorted(Path("mutants").rglob("*.py.meta")):
    src = str(meta.relative_to("mutants"))[: -len(".meta")]
    if not fnmatch.fnmatch(src, sys.argv[1]):
        continue
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    c = Counter(recheck.get(name, status_by_exit_code[code]) for name, code in codes.items())
    per_file[src] = c
    counts.update(c)
for src, c in per_file.items():
    print(f"  {src}: {dict(c)}")
tried = counts["killed"] + counts["survived"] + counts["timeout"]
score = 100.0 * (counts["killed"] + counts["timeout"]) / tried if tried else 0.0
print(f"TOTAL mutants={sum(counts.values())} killed={counts['killed']} survived={counts['survived']}"
      f" timeout={counts['timeout']} no_tests={counts['no tests']} not_checked={counts['not checked']}"
      f" other={sum(counts.values()) - tried - counts['no tests'] - counts['not checked']}"
      f" score={score:.1f}% (killed+timeout)/(killed+survived+timeout)")
EOF
  )
}

copy_tree() {  # $1: pathspecs; copies what exists (a tracked file may be deleted)
  git ls-files -z -co --exclude-standard -- "$@" |
    while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -xf - -C "$work"
}

case "$action" in
  run) ;;
  summary) summary; exit 0 ;;
  survivors)
    cd "$work" && "$PYTHON" -m mutmut results | grep -F ": survived" | sed 's/^ *//' | sed 's/: survived$//'
    exit 0 ;;
  show) cd "$work" && exec "$PYTHON" -m mutmut show "${3:?mutant name}" ;;
  kinds)  # survivors (less those a recheck killed) sorted into log / message / other
    bash "$0" "$module" survivors | while IFS= read -r m; do
      grep -qF "$m	killed" "$work/recheck.tsv" 2>/dev/null || echo "$m"
    done | "$PYTHON" "$root/tools/mutation_kinds.py" "$work/mutants"
    exit 0 ;;
  recheck)
    # mutmut forks its workers from a process that has already imported the code, so a
    # mutant in a function that only runs at import time (codec's _validator/_scalar
    # build the schema table then) cannot take effect there. Re-run the survivors that
    # match the globs in a fresh interpreter, mutant active from the first import.
    shift 2
    [ $# -gt 0 ] || set -- '*'
    copy_tree tests
    cp -r "$work/tests/." "$work/mutants/tests/"
    bash "$0" "$module" survivors > "$work/recheck.todo"
    while IFS= read -r m; do
      hit=""
      for g in "$@"; do [[ $m == $g ]] && hit=1; done
      [ -n "$hit" ] || continue
      rc=0
      (cd "$work/mutants" && MUTANT_UNDER_TEST=$m timeout 600 "$PYTHON" -m pytest -q -x -p no:randomly \
        $extra_args $tests >/dev/null 2>&1) || rc=$?
      if [ $rc -eq 0 ]; then v=survived; else v=killed; fi
      printf '%s\t%s\t%s\n' "$m" "$v" "$rc" | tee -a "$work/recheck.tsv"
    done < "$work/recheck.todo"
    summary; exit 0 ;;
  check)
    mutant=${3:?mutant name}; shift 3
    copy_tree tests
    cp -r "$work/tests/." "$work/mutants/tests/"
    [ $# -gt 0 ] || set -- $tests
    cd "$work/mutants"
    MUTANT_UNDER_TEST=$mutant exec "$PYTHON" -m pytest -q -x -p no:randomly $extra_args "$@" ;;
  *) echo "unknown action: $action" >&2; exit 2 ;;
esac

if grep -q '^\[tool\.mutmut\]' pyproject.toml; then
  echo "pyproject.toml has [tool.mutmut]: mutmut would ignore the per-module setup.cfg" >&2
  exit 2
fi
rm -rf "$work"
mkdir -p "$work"
copy_tree protocol cpm knexad p2p harness benchmarks tests pyproject.toml
if [ -n "${MUTATION_TESTS_REF:-}" ]; then
  # the tests as of a commit (e.g. HEAD: the score before uncommitted new tests), the
  # code as it is now; selected files the commit does not have are dropped
  rm -rf "$work/tests"
  git archive "$MUTATION_TESTS_REF" tests | tar -xf - -C "$work"
  kept=""
  for t in $tests; do [ -f "$work/$t" ] && kept="$kept $t"; done
  tests=$kept
fi
{
  echo "[mutmut]"
  echo "source_paths ="
  for p in protocol cpm knexad p2p harness benchmarks; do echo "    $p"; done
  echo "only_mutate = $only"
  echo "pytest_add_cli_args_test_selection ="
  for t in $tests; do echo "    $t"; done
  [ -z "$extra_args" ] || { echo "pytest_add_cli_args ="; for a in $extra_args; do echo "    $a"; done; }
  echo "timeout_multiplier = 5.0"
  echo "timeout_constant = 2.0"
  echo "use_git_change_detection = false"
} > "$work/setup.cfg"

names=()
if [ -n "${MUTATION_SAMPLE:-}" ]; then
  # Generate every mutant (and the test map) with a run of a name that matches none,
  # then draw the sample from the generated names.
  (cd "$work" && "$PYTHON" -m mutmut run --max-children "${MUTATION_JOBS:-2}" "__none__*" >/dev/null)
  mapfile -t names < <(cd "$work" && "$PYTHON" - "$only" "$MUTATION_SAMPLE" "${MUTATION_SEED:-14}" <<'EOF'
import fnmatch, json, random, sys
from pathlib import Path
names = []
for meta in sorted(Path("mutants").rglob("*.py.meta")):
    src = str(meta.relative_to("mutants"))[: -len(".meta")]
    if fnmatch.fnmatch(src, sys.argv[1]):
        names += sorted(json.loads(meta.read_text())["exit_code_by_key"])
random.Random(int(sys.argv[3])).shuffle(names)
print("\n".join(names[: int(sys.argv[2])]))
EOF
  )
  echo "sample: ${#names[@]} mutants (seed ${MUTATION_SEED:-14})"
fi
(cd "$work" && "$PYTHON" -m mutmut run --max-children "${MUTATION_JOBS:-2}" "${names[@]}")
summary
