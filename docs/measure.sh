#!/usr/bin/env bash
# Re-measures every number table of README.md and prints each table in the README's markdown shape,
# with the command that produced it, so the README can be refreshed in one command:
#
#   docs/measure.sh            # the README's sizes and run counts (tens of minutes on 2 cores)
#   docs/measure.sh --quick    # small guests, one run each: checks the pipeline in a few minutes
#                              # (the numbers are NOT the README's: sizes and run counts differ)
#
# Tables (README section in brackets):
#   1. the default workload, lockless vs locked aging        ["What the core measures here"]
#   2. kvmmu bench --quick, TDP and shadow                     ["Performance against the limits"]
#   3. the bench scaling sweep (full mode only: 16 GiB guest)  [same section, the prose line]
#   4. access-tracking -p compare, 1 and 2 vCPUs               ["Reproducing KVM's results"]
#   5. mmu-stress compare                                      [same section]
#   6. access-tracking -p compare on the shadow MMU            [same section]
#   7. vs-kvm (skipped without /dev/kvm)                       ["Held against the real kernel"]
#   8. huge pages: THP leaves, NX huge pages counts            ["Huge pages, dirty logging, ..."]
#   9. dirty logging: the four modes, eager splitting on THP   [same section]
#  10. nested guests: lockless / locked shadow aging over L2   [same section]
#
# Needs jq. Progress goes to stderr, tables to stdout: `docs/measure.sh > tables.md`.
# KVMMU=path/to/kvmmu uses an already-built binary instead of building the release one.
set -euo pipefail

QUICK=0
case "${1:-}" in
--quick) QUICK=1 ;;
"") ;;
*)
    echo "usage: $0 [--quick]" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.."
command -v jq >/dev/null || {
    echo "error: docs/measure.sh needs jq (apt-get install jq)" >&2
    exit 2
}
if [[ -z "${KVMMU:-}" ]]; then
    cargo build --release -p kvmmu-cli >&2
    KVMMU=target/release/kvmmu
fi
K=$KVMMU
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ((QUICK)); then
    RUN_BYTES=64M RUN_REPS=1
    BENCH=(--quick --reps 1)
    AT_BYTES=64M AT_RUNS=1
    SH_BYTES=32M SH_RUNS=1
    MS=(-c 2 -m 512M -s 64M --age) MS_RUNS=1
    VS=(-b 32M --runs 1)
    HP_BYTES=64M DL=(-v 2 -b 64M -i 2) DL_RUNS=1 NE_BYTES=32M NE_RUNS=1
else
    RUN_BYTES=512M RUN_REPS=3
    BENCH=(--quick)
    AT_BYTES=1G AT_RUNS=5
    SH_BYTES=128M SH_RUNS=3
    MS=(-c 2 -m 4G -s 256M --age) MS_RUNS=3
    VS=()
    HP_BYTES=256M DL=(-v 2 -b 512M -i 3) DL_RUNS=3 NE_BYTES=128M NE_RUNS=3
fi

say() { echo "measure.sh: $*" >&2; }
# jq helpers: `fixed(d)` prints a number with exactly d decimals; `ms(d)` seconds as milliseconds.
DEFS='
  def fixed($d): (. * pow(10; $d) | round) as $n
    | ($n | fabs | tostring) as $a
    | ([range(0; $d + 1 - ($a | length))] | map("0") | join("")) + $a
    | (if $n < 0 then "-" else "" end)
      + (if $d == 0 then . else .[0:length - $d] + "." + .[length - $d:] end);
  def ms($d): if . == null then "–" else "\(. * 1000 | fixed($d)) ms" end;
  def x($d): "\(fixed($d))x";
'
show() { printf '\n```sh\n%s\n```\n\n' "$*"; }

# --- 1. the default workload --------------------------------------------------------------------
say "default workload, ${RUN_REPS} run(s) per aging mode, -b $RUN_BYTES"
echo "### The default workload (README: What the core measures here)"
show "kvmmu -v 1 -b $RUN_BYTES --passes 5 --aging lockless    # and --aging locked; $RUN_REPS run(s) each, alternated"
for ((r = 0; r < RUN_REPS; r++)); do
    for aging in lockless locked; do
        "$K" -v 1 -b "$RUN_BYTES" --passes 5 --aging "$aging" --json >"$TMP/run-$aging-$r.json"
    done
done
# Per run: populate faults/s per vCPU, the all-young pass (pass 1), the no-young passes (median of 2..5).
run_metrics='
  def metrics:
  def secs($n): [.phases[] | select(.name == $n) | .seconds][0];
  def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  { pop: (.counts.guest_pages / secs("populate") / .config.vcpus / 1e6),
    young: (.counts.aged_sptes_first_pass / secs("aging pass 1") / 1e6),
    idle: (.counts.guest_pages / ([.phases[] | select(.name | test("^aging pass [2-9]")) | .seconds] | median) / 1e6) };'
span() { # span FIELD AGING -> "a–b" over the runs
    jq -rs --arg f "$1" "$DEFS$run_metrics"'
      def fmt: if . >= 100 then fixed(0) elif . >= 10 then fixed(1) else fixed(2) end;
      [.[] | metrics | .[$f]] | (min | fmt) as $a | (max | fmt) as $b
      | if $a == $b then $a else "\($a)–\($b)" end' "$TMP"/run-"$2"-*.json
}
pages=$(jq -r '.counts.guest_pages' "$TMP/run-lockless-0.json")
echo "| metric (1 vCPU, $RUN_BYTES, $pages pages) | lockless aging | locked aging |"
echo "|---|---|---|"
echo "| populate, faults/s per vCPU (TDP, incl. GUP and host frame allocation) | $(span pop lockless) M | $(span pop locked) M |"
echo "| aging pass, every SPTE young (clears A) | $(span young lockless) M SPTEs/s | $(span young locked) M SPTEs/s |"
echo "| aging pass, no SPTE young | $(span idle lockless) M SPTEs/s | $(span idle locked) M SPTEs/s |"

# --- 2. bench --quick ---------------------------------------------------------------------------
say "bench ${BENCH[*]} (TDP, then shadow)"
echo
echo "### kvmmu bench (README: Performance against the limits and the alternatives)"
show "kvmmu bench ${BENCH[*]}    # and --mmu shadow"
"$K" bench "${BENCH[@]}" --json >"$TMP/bench-tdp.json"
"$K" bench "${BENCH[@]}" --mmu shadow --json >"$TMP/bench-shadow.json"
echo "| ratio | TDP MMU | shadow MMU | target | status (TDP / shadow) |"
echo "|---|---|---|---|---|"
jq -rn --slurpfile t "$TMP/bench-tdp.json" --slurpfile s "$TMP/bench-shadow.json" "$DEFS"'
  def fmt: if . == null then "–" elif . >= 100 then fixed(1) elif . >= 10 then fixed(2) else fixed(3) end;
  def status: if . == null then "shown" elif . then "met" else "missed" end;
  ($s[0].ratios | map({(.id): .}) | add) as $sh
  | $t[0].ratios[]
  | . as $r | ($sh[$r.id] // {}) as $o
  | "| \($r.name) | \($r.value | fmt) | \($o.value | fmt) | \(if $r.target == null then "–" else (if $r.higher_is_better then "≥ " else "≤ " end) + ($r.target | tostring) end) | \($r.meets | status) / \($o.meets | status) |"'

# --- 3. the scaling sweep (full only) ----------------------------------------------------------
if ((!QUICK)); then
    say "bench --only scaling --reps 3"
    echo
    echo "### Scaling (README: the line after the bench table)"
    show "kvmmu bench --only scaling --reps 3"
    "$K" bench --only scaling --reps 3 --json >"$TMP/scaling.json"
    echo "| figure | median | unit |"
    echo "|---|---|---|"
    jq -r "$DEFS"'.figures[] | select(.scenario == "scaling") | "| \(.name) | \(.median | fixed(1)) | \(.unit) |"' "$TMP/scaling.json"
fi

# --- 4. access-tracking -p compare --------------------------------------------------------------
echo
echo "### access-tracking -p, lockless / locked / no aging (README: Reproducing KVM's results)"
for v in 1 2; do
    say "compare access-tracking -v $v -b $AT_BYTES -p, $AT_RUNS run(s)"
    show "kvmmu compare --runs $AT_RUNS --configs lockless,locked,no-aging access-tracking -v $v -b $AT_BYTES -p"
    "$K" compare --runs "$AT_RUNS" --configs lockless,locked,no-aging --json \
        access-tracking -v "$v" -b "$AT_BYTES" -p >"$TMP/at-$v.json"
done
cell() { # cell FILE ROW "a/b" -> "x / y ms = **r x**"
    jq -r --arg row "$2" --arg pair "$3" "$DEFS"'
      ([.rows[] | select(.name == $row)][0].medians) as $m
      | ($pair | split("/") | map(tonumber)) as [$a, $b]
      | "\($m[$a] * 1000 | fixed(1)) / \($m[$b] | ms(1)) = **\($m[$a] / $m[$b] | x(2))**"' "$1"
}
ratio() { # ratio FILE ROW "a/b" -> "**r x**"
    jq -r --arg row "$2" --arg pair "$3" "$DEFS"'
      ([.rows[] | select(.name == $row)][0].medians) as $m
      | ($pair | split("/") | map(tonumber)) as [$a, $b]
      | "**\($m[$a] / $m[$b] | x(2))**"' "$1"
}
echo "| quantity | kvmmu, \`-v 1\` | published, 1 vCPU | kvmmu, \`-v 2\` | published, 2 vCPUs |"
echo "|---|---|---|---|---|"
echo "| avg aging pass, locked / lockless | $(cell "$TMP/at-1.json" aging_avg_pass_s 1/0) | 8.24 / 7.31 ms = 1.13x | $(cell "$TMP/at-2.json" aging_avg_pass_s 1/0) | 18.0 / 14.0 ms = 1.29x |"
echo "| vCPU wall time, lockless aging / no aging | $(cell "$TMP/at-1.json" vcpu_wall_time_s 0/2) | 0.912 / 0.879 s = 1.04x | $(cell "$TMP/at-2.json" vcpu_wall_time_s 0/2) | 1.038 / 0.985 s = 1.05x |"
echo "| vCPU wall time, locked aging / no aging | $(cell "$TMP/at-1.json" vcpu_wall_time_s 1/2) | 0.938 / 0.879 s = 1.07x | $(cell "$TMP/at-2.json" vcpu_wall_time_s 1/2) | 1.058 / 0.985 s = 1.07x |"
echo "| vCPU wall time, locked / lockless | $(ratio "$TMP/at-1.json" vcpu_wall_time_s 1/0) | 1.03x | $(ratio "$TMP/at-2.json" vcpu_wall_time_s 1/0) | 1.02x |"

# --- 5. mmu-stress compare ----------------------------------------------------------------------
say "compare mmu-stress ${MS[*]}, $MS_RUNS run(s)"
echo
echo "### mmu-stress, lockless / locked / no aging (README: Reproducing KVM's results)"
show "kvmmu compare --runs $MS_RUNS --configs lockless,locked,no-aging mmu-stress ${MS[*]}"
"$K" compare --runs "$MS_RUNS" --configs lockless,locked,no-aging --json mmu-stress "${MS[@]}" >"$TMP/ms.json"
echo "| stage (medians) | lockless | locked | no aging | locked / lockless | lockless / no aging |"
echo "|---|---|---|---|---|---|"
jq -r "$DEFS"'
  def r($a; $b): if $a == null or $b == null or $b == 0 then "–" else "**\($a / $b | x(2))**" end;
  .rows[] | .medians as $m
  | "| \(.name) | \($m[0] | ms(1)) | \($m[1] | ms(1)) | \($m[2] | ms(1)) | \(r($m[1]; $m[0])) | \(r($m[0]; $m[2])) |"' "$TMP/ms.json"

# --- 6. the shadow MMU compare ------------------------------------------------------------------
say "compare access-tracking -p --mmu shadow -v 2 -b $SH_BYTES, $SH_RUNS run(s)"
echo
echo "### access-tracking -p on the shadow MMU (README: Reproducing KVM's results, item 6)"
show "kvmmu compare --configs lockless,locked --runs $SH_RUNS access-tracking -p --mmu shadow -v 2 -b $SH_BYTES"
"$K" compare --configs lockless,locked --runs "$SH_RUNS" --json \
    access-tracking -p --mmu shadow -v 2 -b "$SH_BYTES" >"$TMP/shadow.json"
echo "| quantity (shadow MMU, \`-v 2 -b $SH_BYTES -p\`, medians of $SH_RUNS) | lockless | locked | locked / lockless | published (\`-v 64\`) |"
echo "|---|---|---|---|---|"
jq -r "$DEFS"'
  def row($n): [.rows[] | select(.name == $n)][0].medians;
  (row("aging_avg_pass_s")) as $p | (row("vcpu_wall_time_s")) as $w
  | "| avg aging pass | \($p[0] | ms(2)) | \($p[1] | ms(2)) | **\($p[1] / $p[0] | x(2))** | 30x |",
    "| vCPU wall time | \($w[0] | ms(2)) | \($w[1] | ms(2)) | \($w[1] / $w[0] | x(2)) | \"no notable improvement\" |"' "$TMP/shadow.json"

# --- 7. vs-kvm ----------------------------------------------------------------------------------
echo
echo "### kvmmu against /dev/kvm (README: Held against the real kernel)"
show "kvmmu vs-kvm ${VS[*]}"
if [[ -e /dev/kvm ]] && "$K" vs-kvm "${VS[@]}" --json >"$TMP/vs.json" 2>"$TMP/vs.err"; then
    say "vs-kvm ${VS[*]}"
    jq -r "$DEFS"'
      def names: {"kvm": "kvm (`/dev/kvm`)", "kvmmu-tdp": "kvmmu TDP", "kvmmu-shadow": "kvmmu shadow"};
      "| backend (\(.bytes / 1048576) MiB, \(.hot_percent)% re-touched, medians of \(.runs)) | populate ns/page | ratio | re-touch ns/page | ratio |",
      "|---|---|---|---|---|",
      (.rows[] | "| \(names[.backend] // .backend) | \(.populate_ns_per_page | fixed(1)) | \(.populate_ratio | x(3)) | \(.retouch_ns_per_page | fixed(1)) | \(.retouch_ratio | x(3)) |")' "$TMP/vs.json"
else
    echo "(skipped: no usable /dev/kvm here: $(head -c 200 "$TMP/vs.err" 2>/dev/null || true))"
fi
# --- 8. huge pages ------------------------------------------------------------------------------
say "huge pages: access-tracking -s anonymous_thp, nx-huge-pages"
echo
echo "### Huge pages (README: Huge pages, dirty logging, memory overcommit)"
show "kvmmu access-tracking -v 2 -b $HP_BYTES -s anonymous_thp --json [--mmu shadow]; kvmmu nx-huge-pages --json [--mmu shadow]"
echo "| MMU | THP guest: pages_2m / pages_4k | nx-huge-pages (pages_2m, nx_lpage_splits) per step, recovery, final read |"
echo "|---|---|---|"
for mmu in tdp shadow; do
    "$K" access-tracking -v 2 -b "$HP_BYTES" -s anonymous_thp --mmu "$mmu" --json >"$TMP/thp-$mmu.json"
    "$K" nx-huge-pages --mmu "$mmu" --json >"$TMP/nx-$mmu.json"
    thp=$(jq -r '"\(.counts.pages_2m) / \(.counts.pages_4k)"' "$TMP/thp-$mmu.json")
    nx=$(jq -r '[.checks[] | select(.name != "VM created") | .detail | select(test("pages_2m, nx_lpage_splits")) | sub("^.*= "; "")] | join(" ")' "$TMP/nx-$mmu.json")
    echo "| $mmu | $thp | $nx |"
done

# --- 9. dirty logging ---------------------------------------------------------------------------
say "compare dirty-log-perf ${DL[*]}, $DL_RUNS run(s); -s anonymous_thp with eager splitting on/off"
echo
echo "### Dirty logging (README: Huge pages, dirty logging, memory overcommit)"
show "kvmmu compare --runs $DL_RUNS --configs manual-log,classic-log,dirty-ring,d-bit dirty-log-perf ${DL[*]}"
"$K" compare --runs "$DL_RUNS" --configs manual-log,classic-log,dirty-ring,d-bit --json \
    dirty-log-perf "${DL[@]}" >"$TMP/dl.json"
echo "| phase (medians) | manual-log | classic-log | dirty-ring | d-bit |"
echo "|---|---|---|---|---|"
jq -r "$DEFS"'
  .rows[] | select(.name | test("dirty memory|get dirty log|clear dirty log|total"))
  | .medians as $m | "| \(.name | sub("dirty_memory_total_seconds"; "dirty memory, all iterations")) | \($m[0] | ms(2)) | \($m[1] | ms(2)) | \($m[2] | ms(2)) | \($m[3] | ms(2)) |"' "$TMP/dl.json"
echo
show "kvmmu dirty-log-perf ${DL[*]} -s anonymous_thp --json [--eager-split off] [--mmu shadow]"
echo "| MMU, eager split | enable | iteration 1 dirty | 2M leaves after populate / enable / disable | dirty-phase faults fast / slow |"
echo "|---|---|---|---|---|"
for mmu in tdp shadow; do
    for eager in on off; do
        "$K" dirty-log-perf "${DL[@]}" -s anonymous_thp --mmu "$mmu" --eager-split "$eager" --json >"$TMP/dlt.json"
        jq -r --arg row "$mmu, $eager" "$DEFS"'
          def secs($n): [.phases[] | select(.name == $n) | .seconds][0];
          .counts as $c
          | ([$c | to_entries[] | select(.key | test("^iter[0-9]+\\.dirty\\.pf_fixed$")) | .value] | add) as $slow
          | "| \($row) | \(secs("enable dirty logging") | ms(2)) | \(secs("iteration 1 dirty memory") | ms(1)) | \($c["populate.pages_2m"]) / \($c["enable.pages_2m"]) / \($c["disable.pages_2m"]) | \($c["dirty_phases.pf_fast"]) / \($slow) |"' "$TMP/dlt.json"
    done
done

# --- 10. nested guests --------------------------------------------------------------------------
say "compare access-tracking --nested -p -v 2 -b $NE_BYTES, $NE_RUNS run(s)"
echo
echo "### Nested guests (README: Huge pages, dirty logging, memory overcommit)"
show "kvmmu compare --configs lockless,locked --runs $NE_RUNS access-tracking --nested -p -v 2 -b $NE_BYTES"
"$K" compare --configs lockless,locked --runs "$NE_RUNS" --json \
    access-tracking --nested -p -v 2 -b "$NE_BYTES" >"$TMP/nested.json"
jq -r "$DEFS"'
  def row($n): [.rows[] | select(.name == $n)][0].medians;
  (row("aging_avg_pass_s")) as $p | (row("vcpu_wall_time_s")) as $w
  | "| quantity (L2 vCPUs over L1 on TDP, medians of '"$NE_RUNS"') | lockless | locked | locked / lockless |",
    "|---|---|---|---|",
    "| avg aging pass | \($p[0] | ms(2)) | \($p[1] | ms(2)) | **\($p[1] / $p[0] | x(2))** |",
    "| vCPU wall time | \($w[0] | ms(2)) | \($w[1] | ms(2)) | \($w[1] / $w[0] | x(2)) |"' "$TMP/nested.json"
echo
show "kvmmu access-tracking --nested -v 2 -b $NE_BYTES --json    # and --aging locked"
echo "| aging | indirect_shadow_pages | max_mmu_rmap_size | rmap_aged_sptes | rmap-bit waits (ager / writer) | per million aged |"
echo "|---|---|---|---|---|---|"
for aging in lockless locked; do
    "$K" access-tracking --nested -v 2 -b "$NE_BYTES" --aging "$aging" --json >"$TMP/ne-$aging.json"
    jq -r --arg a "$aging" "$DEFS"'
      .counts as $c
      | (($c.rmap_lock_contended_readonly + $c.rmap_lock_contended_writer) * 1e6
         / (if $c.rmap_aged_sptes > 0 then $c.rmap_aged_sptes else 1 end)) as $pm
      | "| \($a) | \($c.indirect_shadow_pages) | \($c.max_mmu_rmap_size) | \($c.rmap_aged_sptes) | \($c.rmap_lock_contended_readonly) / \($c.rmap_lock_contended_writer) | \($pm | fixed(2)) |"' "$TMP/ne-$aging.json"
done
say "done"
