#include "vmm-core/vm/nested_page_prefault.h"

#include <sys/mman.h>

#include <chrono>
#include <cstring>

#include "common/error.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/boot/cpu_setup.h"

namespace clonevm::vmm {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kPteAccessed = 1ull << 5;
constexpr uint64_t kPteDirty = 1ull << 6;
constexpr uint64_t kTwoMiB = 2 * layout::kMiB;

// rsi: the address list, rcx: how many. Reads one byte of each page; every 64 pages an
// `out` to kPrefaultChunkPort hands control back (KVM completes it on the next KVM_RUN);
// `out` to kPrefaultDonePort at the end.
constexpr uint8_t kLoop[] = {
    0x48, 0x85, 0xc9,        //  0: test rcx, rcx
    0x74, 0x15,              //  3: jz 26
    0x48, 0x8b, 0x06,        //  5: mov rax, [rsi]
    0x8a, 0x00,              //  8: mov al, [rax]
    0x48, 0x83, 0xc6, 0x08,  // 10: add rsi, 8
    0x48, 0xff, 0xc9,        // 14: dec rcx
    0xf6, 0xc1, 0x3f,        // 17: test cl, 0x3f
    0x75, 0xea,              // 20: jnz 0
    0xe6, kPrefaultChunkPort,  // 22: out kPrefaultChunkPort, al
    0xeb, 0xe6,              // 24: jmp 0
    0xe6, kPrefaultDonePort,   // 26: out kPrefaultDonePort, al
    0xeb, 0xfc,              // 28: jmp 26
};

void putWord(std::vector<uint8_t>& bytes, uint64_t offset, uint64_t value) {
  std::memcpy(bytes.data() + offset, &value, sizeof value);
}

const char* exitName(uint32_t reason) {
  switch (reason) {
    case KVM_EXIT_IO: return "I/O";
    case KVM_EXIT_MMIO: return "MMIO";
    case KVM_EXIT_SHUTDOWN: return "shutdown (triple fault)";
    case KVM_EXIT_FAIL_ENTRY: return "failed entry";
    case KVM_EXIT_INTERNAL_ERROR: return "internal error";
    default: return "other";
  }
}

}  // namespace

PrefaultImage buildPrefaultImage(std::span<const uint64_t> guestAddresses, uint64_t mappedEnd) {
  // The slot itself must be mapped; 2 MiB pages, whole 1 GiB page directories.
  mappedEnd = std::max(mappedEnd, layout::kHighRamStart);
  uint64_t directories = (mappedEnd + layout::kGiB - 1) / layout::kGiB;
  require(directories <= 512, "prefault: guest addresses up to {:#x} need more than one PML4 entry", mappedEnd);
  PrefaultImage image;
  image.codeAddress = kPrefaultSlotAddress;
  image.pml4Address = kPrefaultSlotAddress + kPage;
  uint64_t pdptAddress = image.pml4Address + kPage;
  uint64_t firstPdAddress = pdptAddress + kPage;
  image.listAddress = firstPdAddress + directories * kPage;
  image.count = guestAddresses.size();
  uint64_t listBytes = (image.count * 8 + kPage - 1) / kPage * kPage;
  uint64_t total = image.listAddress - kPrefaultSlotAddress + listBytes;
  require(total <= kPrefaultSlotMaxBytes, "prefault: {} pages do not fit its {} MiB slot", image.count,
          kPrefaultSlotMaxBytes >> 20);
  image.bytes.assign(total, 0);
  std::memcpy(image.bytes.data(), kLoop, sizeof kLoop);
  auto at = [&](uint64_t address) { return address - kPrefaultSlotAddress; };
  uint64_t table = kPtePresent | kPteWritable | kPteAccessed;
  putWord(image.bytes, at(image.pml4Address), pdptAddress | table);
  for (uint64_t d = 0; d < directories; ++d) {
    uint64_t pd = firstPdAddress + d * kPage;
    putWord(image.bytes, at(pdptAddress) + d * 8, pd | table);
    for (uint64_t e = 0; e < 512; ++e) {
      uint64_t address = d * layout::kGiB + e * kTwoMiB;
      putWord(image.bytes, at(pd) + e * 8, address | table | kPteHugePage | kPteDirty);
    }
  }
  for (uint64_t i = 0; i < image.count; ++i) {
    uint64_t address = guestAddresses[i];
    require(address < mappedEnd && !(address >= kPrefaultSlotAddress &&
                                     address < kPrefaultSlotAddress + kPrefaultSlotMaxBytes),
            "prefault: guest address {:#x} is outside guest RAM", address);
    putWord(image.bytes, at(image.listAddress) + i * 8, address);
  }
  return image;
}

NestedPagePrefault::NestedPagePrefault(const KvmVm& vm, uint32_t vcpuId, size_t slotBytes)
    : vcpu_(vm, vcpuId), slotBytes_(slotBytes) {
  void* slot = ::mmap(nullptr, slotBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (slot == MAP_FAILED) throwSystemError(errno, "prefault: mmap its slot");
  slot_ = static_cast<uint8_t*>(slot);
}

NestedPagePrefault::~NestedPagePrefault() {
  // The VM may still map the slot (KVM would fault on a hole): it goes with the process.
}

std::unique_ptr<NestedPagePrefault> NestedPagePrefault::run(
    KvmVm& vm, uint32_t vcpuId, const std::vector<kvm_cpuid_entry2>& cpuid,
    std::span<const uint64_t> guestAddresses, uint64_t mappedEnd, const std::function<bool()>& stop,
    spdlog::logger& log) {
  auto image = buildPrefaultImage(guestAddresses, mappedEnd);
  std::unique_ptr<NestedPagePrefault> prefault(new NestedPagePrefault(vm, vcpuId, image.bytes.size()));
  std::memcpy(prefault->slot_, image.bytes.data(), image.bytes.size());
  vm.setUserMemoryRegion(kPrefaultMemorySlot, kPrefaultSlotAddress, image.bytes.size(), prefault->slot_);

  KvmVcpu& vcpu = prefault->vcpu_;
  vcpu.setCpuid(cpuid);
  kvm_sregs sregs = vcpu.getSregs();
  setupLongModeSregs(sregs);
  sregs.cr3 = image.pml4Address;
  sregs.gdt.base = kPrefaultSlotAddress;
  sregs.gdt.limit = 0;
  sregs.idt.base = kPrefaultSlotAddress;
  sregs.idt.limit = 0;
  vcpu.setSregs(sregs);
  kvm_regs regs{};
  regs.rip = image.codeAddress;
  regs.rsi = image.listAddress;
  regs.rcx = image.count;
  regs.rflags = 0x2;  // interrupts off: nothing but the loop runs
  vcpu.setRegs(regs);
  vcpu.setMpState({KVM_MP_STATE_RUNNABLE});  // an AP would wait for INIT/SIPI

  bool done = false, failed = false;
  while (!done && !failed && !stop()) {
    if (!vcpu.run()) continue;  // a signal
    const kvm_run& exit = *vcpu.runState();
    if (exit.exit_reason == KVM_EXIT_IO && exit.io.port == kPrefaultChunkPort) continue;
    if (exit.exit_reason == KVM_EXIT_IO && exit.io.port == kPrefaultDonePort) {
      done = true;
      break;
    }
    // Seen: a triple fault of the emulated CPU in the lab (docs/LAB.md). KVM on AMD resets a
    // vCPU that shuts down, so its MMU let go of the root: count nothing as read.
    log.warn("prefault: its vCPU stopped on an exit it does not expect ({}, reason {}); the guest "
             "faults in its pages itself", exitName(exit.exit_reason), exit.exit_reason);
    failed = true;
  }
  prefault->pagesRead_ = done ? image.count
                         : failed ? 0
                                  : image.count - std::min<uint64_t>(vcpu.getRegs().rcx, image.count);
  // Its code, tables and list are not needed again: zero pages from now on.
  ::madvise(prefault->slot_, image.bytes.size(), MADV_DONTNEED);
  return prefault;
}

}  // namespace clonevm::vmm
