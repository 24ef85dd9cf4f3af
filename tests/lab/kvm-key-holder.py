#!/usr/bin/env python3
"""Holds one idle KVM vCPU for the life of L1, so that KVM never patches L1's kernel text.

KVM flips static keys (apic_sw_disabled: a vCPU whose local APIC is software-disabled exists)
whenever the first such vCPU is created or the last goes away: every fork and every boot does
both. Each flip rewrites kernel code on all CPUs with int3 breakpoints and IPIs. Under QEMU
TCG with nested SVM, such cross-CPU code patching while other vCPUs enter and leave their
guests has crashed L1 (a #PF taken with the L2 guest's GS base: "TASK stack guard page was
hit" in a vcpu thread) and stalled it (CPUs looping on the int3 at a patched site). With
one software-disabled APIC always present, the key stays on and the code is never patched.
See docs/LAB.md. Not needed, and not used, on real hardware.
"""
import fcntl
import os
import sys
import time

KVM_CREATE_VM = 0xAE01
KVM_CREATE_IRQCHIP = 0xAE60
KVM_CREATE_VCPU = 0xAE41

kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)  # its LAPIC starts software-disabled and stays so
with open(sys.argv[1], "w") as ready:
    ready.write(f"{os.getpid()}\n")
while True:
    time.sleep(3600)
