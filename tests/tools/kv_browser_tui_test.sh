#!/usr/bin/env bash
# The kv-browser terminal UI, driven under tmux: keys go in with send-keys,
# the screen comes back with capture-pane, and each step asserts what the
# screen shows (tags, files, parameters, stats, filter, help, diff, verify).
# Usage: kv_browser_tui_test.sh path/to/kv-browser path/to/kv_browser_fixture_writer
set -uo pipefail
kvb=$1
writer=$2
tmp=$(mktemp -d)
sock="kvb-tui-$$"
session=kvb
cleanup() {
  tmux -L "$sock" kill-server 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
"$writer" "$tmp/store" || { echo "FAILED: fixture"; exit 1; }

failures=0
pass=0
screen() { tmux -L "$sock" capture-pane -p -t "$session"; }
keys() { tmux -L "$sock" send-keys -t "$session" "$@"; }
# expect "what" PATTERN: waits up to 10 s for the screen to show PATTERN.
expect() {
  local what=$1 pattern=$2
  for _ in $(seq 100); do
    if screen | grep -qE -- "$pattern"; then pass=$((pass + 1)); return 0; fi
    sleep 0.1
  done
  echo "FAILED: $what: the screen does not show '$pattern':"
  screen
  failures=$((failures + 1))
}
absent() {  # absent "what" PATTERN: after the screen settled, PATTERN is not shown
  sleep 0.3
  if screen | grep -qE -- "$2"; then
    echo "FAILED: $1: the screen shows '$2':"; screen; failures=$((failures + 1))
  else pass=$((pass + 1)); fi
}

tmux -L "$sock" new-session -d -s "$session" -x 160 -y 40 \
  "TERM=xterm-256color '$kvb' --db '$tmp/store'; echo KVB-EXITED \$?; sleep 30"

expect "the tag list" 'kv-browser .*[|]  tags'
expect "every tag, latest marked" '\[ \] \* step3'
expect "step1 listed" '\[ \]   step1'
expect "tag detail" 'committed  [0-9]{4}-'

keys Enter
expect "files of step1" 'step1  [|]'
expect "the model file" 'mp_rank_00_model_states.pt +7 tensors'
expect "file coordinates" 'kind model_states  pp 0  tp 0'
keys Enter
expect "parameters" 'module/embed.weight +bfloat16 +\[256, 16\]'
expect "embed shared by all tags" 'module/embed.weight .*100% shared'
expect "detail: stats of the first parameter" 'min -32  max 31'
expect "detail: histogram" 'histogram:'
keys Down
expect "layers.0.bias detail" 'mean 0.5  std 0'

keys / 'special' Enter
expect "filter applied" 'filter: special'
expect "filtered row" 'module/special +float32 +\[8\]'
expect "stats with nan and inf" 'nan 1  inf 1  zeros 2'
absent "filter hides other rows" 'module/embed.weight +bfloat16'

keys Left Left
expect "back to tags" '[|]  tags'
keys s
expect "sort by name" 'sort: name'
keys s
expect "sort by size" 'sort: size'
keys s

keys Space Down Space
expect "two tags marked" '\[x\] .*step2'
keys d
expect "diff view" 'diff step1 -> step2'
expect "diff lists the changed tensor" '\* module/layers.1.weight .*changed 2/2048'
expect "diff summary" '1 added, 1 removed, 1 reshaped, 1 changed, 5 unchanged'
keys q
expect "back from diff" '[|]  tags'

keys v
expect "verify view" 'verify step2: ok'
keys q
keys '?'
expect "help" 'diff the two marked tags'
keys q
keys q
expect "quits with 0" 'KVB-EXITED 0'

echo "$pass passed, $failures failed"
[ "$failures" -eq 0 ]
