#pragma once
// Fills KVM's nested page tables (EPT/NPT) with a fork's working set before its guest runs.
//
// A restored guest's first steps fault on every page they touch: KVM maps guest memory into
// the VM's nested page tables one 4 KiB page per fault, and each fault is a VM exit (tens of
// microseconds nested, ~1 µs on bare metal). A fork server's spare has time before its
// request, so it takes those faults itself. Linux 6.10 has KVM_PRE_FAULT_MEMORY for this;
// Debian 12's 6.1 does not. So a helper vCPU, which the guest never sees, runs a short loop
// that reads one byte of each page of the working set. The nested page tables belong to the
// VM: the guest's vCPUs, in the same MMU role, use the root the helper filled.
//
// On 6.1 a TDP root is freed when no vCPU holds it, and restoring a vCPU resets its MMU, so
// the helper vCPU is created after the guest's are restored and is kept, never run again.
// Its memory slot (code, page tables, the page list) sits in the 32-bit hole; it is kept too,
// since deleting a slot drops all of the VM's mappings on 6.1, but its pages are given back.

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include <spdlog/logger.h>

#include "vmm-core/arch/layout.h"
#include "vmm-core/kvm/kvm.h"

namespace clonevm::vmm {

inline constexpr uint64_t kPrefaultSlotAddress = layout::kPrefaultSlotStart;
inline constexpr uint64_t kPrefaultSlotMaxBytes = layout::kPrefaultSlotMaxSize;
inline constexpr uint32_t kPrefaultMemorySlot = 64;  // far from RAM's (0 and 1)
inline constexpr uint16_t kPrefaultChunkPort = 0x01;  // "a chunk is done": the VMM may stop it
inline constexpr uint16_t kPrefaultDonePort = 0x02;   // "every page is read"

// The helper's memory, built once (pure data, tested without KVM): its code at the slot's
// start, then 4-level page tables mapping [0, mappedEnd) with 2 MiB pages (accessed and dirty
// bits set, so a walk writes nothing), then the guest addresses to read.
struct PrefaultImage {
  std::vector<uint8_t> bytes;  // the slot's content; a whole number of 4 KiB pages
  uint64_t codeAddress = 0;
  uint64_t pml4Address = 0;
  uint64_t listAddress = 0;
  uint64_t count = 0;
};
// Throws clonevm::Error if the list does not fit kPrefaultSlotMaxBytes or an address is
// outside [0, mappedEnd) or inside the slot.
PrefaultImage buildPrefaultImage(std::span<const uint64_t> guestAddresses, uint64_t mappedEnd);

class NestedPagePrefault {
 public:
  // Creates the helper vCPU (id `vcpuId`, with `cpuid`) and its slot in `vm`, and reads each
  // page at `guestAddresses` in chunks, asking `stop` between chunks. Returns how many pages
  // were read. A vCPU exit it does not expect ends it early (logged), never the VM.
  static std::unique_ptr<NestedPagePrefault> run(KvmVm& vm, uint32_t vcpuId,
                                                 const std::vector<kvm_cpuid_entry2>& cpuid,
                                                 std::span<const uint64_t> guestAddresses,
                                                 uint64_t mappedEnd, const std::function<bool()>& stop,
                                                 spdlog::logger& log);
  ~NestedPagePrefault();
  NestedPagePrefault(const NestedPagePrefault&) = delete;
  NestedPagePrefault& operator=(const NestedPagePrefault&) = delete;

  uint64_t pagesRead() const { return pagesRead_; }

 private:
  NestedPagePrefault(const KvmVm& vm, uint32_t vcpuId, size_t slotBytes);

  KvmVcpu vcpu_;
  uint8_t* slot_ = nullptr;
  size_t slotBytes_ = 0;
  uint64_t pagesRead_ = 0;
};

}  // namespace clonevm::vmm
