#!/bin/bash
# How much of an idle fork's private guest memory is still the template's (docs/BENCHMARKS.md,
# "Which fork pages are the template's"): boots a template (256 MiB, like clone-fork-bench),
# snapshots it, starts 6 forks (`clone-vmm --restore`; the first records the working set), has
# each answer its console and one `clone exec -- true`, leaves them idle 60 s, then compares
# every resident page of each fork's memfd with the template's memory file
# (fork_clean_pages.py). Runs inside the lab, as root (it reads /proc/PID/pagemap and mem):
#   tests/lab/run --mem 6G --timeout 800 -- tests/bench/fork_clean_pages.sh
set -u; trap '' PIPE
B=${CLONE_BUILD:-$(cd "$(dirname "$0")/../.." && pwd)/build}; work=$(mktemp -d /tmp/clean.XXXXXX)
mkfifo $work/tin
$B/bin/clone run --no-jail --kernel $B/guest/vmlinuz --initrd $B/guest/initrd.img --cmdline "console=ttyS0 panic=-1 quiet" --mem-mb 256 --api-socket $work/t.sock < $work/tin > $work/t.out 2>&1 &
exec {tw}>$work/tin
for i in $(seq 300); do grep -q CLONE-GUEST-READY $work/t.out && break; sleep 1; done
sleep 3
$B/bin/clone snapshot --vm $work/t.sock --output $work/tpl >/dev/null || exit 1
pids=()
for i in 0 1 2 3 4 5; do
  mkfifo $work/in$i
  $B/bin/clone-vmm --restore $work/tpl --api-socket $work/f$i.sock < $work/in$i > $work/o$i 2>&1 &
  pids+=($!); exec {fd}>$work/in$i
  echo 'echo ALIVE-$((20+22))' >&$fd
  for s in $(seq 60); do grep -q '^ALIVE-42' $work/o$i && break; sleep 1; done
  $B/bin/clone exec --vm $work/f$i.sock -- true || echo "exec failed in fork $i"
  [ $i = 0 ] && sleep 2
done
echo "idle 60 s"; sleep 60
python3 "$(dirname "$0")/fork_clean_pages.py" $work/tpl/memory "${pids[@]}"
for p in "${pids[@]}"; do echo "pss $p $(awk '/^Pss:/ {print $2}' /proc/$p/smaps_rollup) KiB"; done
kill -9 "${pids[@]}" $! 2>/dev/null
