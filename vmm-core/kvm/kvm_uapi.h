#pragma once
// Include this instead of <linux/kvm.h>.
//
// Debian 12's kernel headers (6.1) declare flexible arrays with __DECLARE_FLEX_ARRAY, which in
// C++ wraps an empty struct (size 1) before the array. That moves kvm_cpuid2::entries from
// offset 8 to 12, so the size encoded in KVM_GET_SUPPORTED_CPUID & co. differs from the
// kernel's and KVM answers EINVAL. Declare the arrays the C way, and check the layouts.

#include <linux/stddef.h>
#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]

#include <linux/kvm.h>

#include <cstddef>

static_assert(offsetof(kvm_cpuid2, entries) == 8 && sizeof(kvm_cpuid2) == 8);
static_assert(offsetof(kvm_msrs, entries) == 8 && sizeof(kvm_msrs) == 8);
static_assert(offsetof(kvm_msr_list, indices) == 4 && sizeof(kvm_msr_list) == 4);
static_assert(offsetof(kvm_irq_routing, entries) == 8 && sizeof(kvm_irq_routing) == 8);
static_assert(KVM_GET_SUPPORTED_CPUID == 0xc008ae05);
