#!/usr/bin/env python3
# fork_clean_pages.py TEMPLATE_MEMORY PID...: for each fork's clone-vmm, how many of its
# resident guest-memory (memfd) pages are byte-identical to the template's memory file. Only
# resident pages are read (pagemap's present bit), so the fork's userfaultfd is not woken.
# Identical pages are what a copy-on-write mapping of the template would have kept shared: an
# upper bound, since a page the guest rewrote with the same bytes counts as identical.
import struct
import sys
tmpl = open(sys.argv[1], 'rb')
for pid in sys.argv[2:]:
    maps = open(f'/proc/{pid}/maps').read().splitlines()
    region = None
    for line in maps:
        if '/memfd:' in line and 'rw-s' in line:
            a, b = [int(x, 16) for x in line.split()[0].split('-')]
            off = int(line.split()[2], 16)
            if region is None or b - a > region[1] - region[0]:
                region = (a, b, off)
    a, b, off = region
    pm = open(f'/proc/{pid}/pagemap', 'rb'); mem = open(f'/proc/{pid}/mem', 'rb')
    present = same = zero = 0
    npages = (b - a) // 4096
    pm.seek((a // 4096) * 8); entries = pm.read(npages * 8)
    for i in range(npages):
        e = struct.unpack_from('<Q', entries, i * 8)[0]
        if not (e >> 63) & 1:
            continue
        present += 1
        mem.seek(a + i * 4096); page = mem.read(4096)
        tmpl.seek(off + i * 4096); t = tmpl.read(4096)
        if len(t) < 4096: t = t + bytes(4096 - len(t))
        if page == t: same += 1
        if page == bytes(4096): zero += 1
    print(f'pid {pid}: resident {present} pages ({present*4} KiB), identical to template {same} ({same*4} KiB), all-zero {zero}, differing {present-same} ({(present-same)*4} KiB)')
