#!/usr/bin/env bash
# Puts every audit chain of one pod back together from what the audit-shipper sidecar shipped,
# and checks each with `kore-gateway audit verify`.
#
#   config/kubernetes/verify-shipped-audit.sh SHIPPED.jsonl POD [AUDIT-VERIFY OPTION…]
#
# SHIPPED.jsonl: the records as the aggregator stored them, one JSON object a line, as
# gateway-sidecar.yaml's Fluent Bit sends them: {"log": "<the audit line, unchanged>",
# "file": "<its path on the pod>", "pod": "<pod name>", "namespace": …}. Records may come in any
# order and more than once (delivery is at least once). A chain is one writer's history:
# deactivations.jsonl with its rotated deactivations.NNNNNN.jsonl files, or with
# `serve --workers N` deactivations-wN.jsonl and its rotated files. Its lines are ordered by
# `seq`, duplicates dropped, and written to $OUT (default ./shipped-POD) as one file per chain,
# which `audit verify` checks from seq 1 on: a lost, altered or reordered record fails it. The
# pod's gateway log lines (with the audit.anchor lines) are written there as gateway.jsonl.
# Options after POD go to `audit verify` as they are. Needs jq; exits non-zero if a chain fails.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,6p' "$0" >&2; exit 2; }
shipped=$1 pod=$2
shift 2
out=${OUT:-shipped-$pod}
verify=${KORE_GATEWAY:-kore-gateway}
export LC_ALL=C
mkdir -p "$out"
rm -f "$out"/*.jsonl

# "<chain> <seq> <line>" for each audit line of the pod; sort -u on the first two keys drops
# the copies a retried delivery made.
jq -r --arg pod "$pod" '
  select(.pod == $pod and (.file | test("/deactivations[^/]*[.]jsonl$")))
  | (.file | split("/") | last | sub("[.][0-9]{6,}[.]jsonl$"; ".jsonl")) as $chain
  | "\($chain) \(.log | fromjson | .seq) \(.log)"' "$shipped" \
  | sort -k1,1 -k2,2n -u \
  | awk -v dir="$out" '{ file = dir "/" $1; sub(/^[^ ]+ [^ ]+ /, ""); print > file }'
jq -r --arg pod "$pod" '
  select(.pod == $pod and (.file | test("/gateway[^/]*[.]jsonl([.]1)?$"))) | .log' \
  "$shipped" >"$out/gateway.jsonl"

chains=$(find "$out" -maxdepth 1 -name 'deactivations*.jsonl' | sort)
[ -n "$chains" ] || { echo "no audit line of pod $pod in $shipped" >&2; exit 1; }
status=0
for chain in $chains; do
  printf '%s: ' "$chain"
  "$verify" audit verify "$chain" "$@" || status=1
done
exit $status
