#include "vmm-core/boot/cpu_setup.h"

#include <vector>

#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {
namespace {

constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kEntriesPerTable = 512;
constexpr uint64_t kHugePageSize = 2 * layout::kMiB;
constexpr uint64_t kIdentityMappedGiB = 4;  // one PD per GiB, see layout::kPdAddr
constexpr uint8_t kTypeCodeExecuteReadAccessed = 0xb;
constexpr uint8_t kTypeDataReadWriteAccessed = 0x3;
constexpr uint8_t kTypeTss64Busy = 0xb;
constexpr uint32_t kTss64Limit = 0x67;  // a 64-bit TSS is 104 bytes

kvm_segment flatSegment(uint16_t selector, uint8_t type, bool longMode) {
  kvm_segment segment{};
  segment.base = 0;
  segment.limit = 0xffffffff;
  segment.selector = selector;
  segment.type = type;
  segment.present = 1;
  segment.dpl = 0;
  segment.db = longMode ? 0 : 1;  // L and D/B are exclusive for a 64-bit code segment
  segment.s = 1;
  segment.l = longMode ? 1 : 0;
  segment.g = 1;
  return segment;
}

}  // namespace

kvm_segment bootCodeSegment() {
  return flatSegment(kBootCodeSelector, kTypeCodeExecuteReadAccessed, /*longMode=*/true);
}

kvm_segment bootDataSegment() {
  return flatSegment(kBootDataSelector, kTypeDataReadWriteAccessed, /*longMode=*/false);
}

kvm_segment bootTssSegment() {
  // VMX entry wants TR to hold a busy 64-bit TSS; Linux loads its own before using it.
  kvm_segment segment{};
  segment.base = 0;
  segment.limit = kTss64Limit;
  segment.selector = kBootTssSelector;
  segment.type = kTypeTss64Busy;
  segment.present = 1;
  segment.s = 0;
  segment.g = 0;
  return segment;
}

uint64_t encodeSegmentDescriptor(const kvm_segment& segment) {
  // With G set the descriptor counts 4 KiB units; KVM's limit is always in bytes.
  const uint64_t limit = segment.g ? segment.limit >> 12 : segment.limit;
  const uint64_t base = segment.base;
  return (limit & 0xffff) | ((base & 0xffffff) << 16) | (uint64_t{segment.type} & 0xf) << 40 |
         (uint64_t{segment.s} & 1) << 44 | (uint64_t{segment.dpl} & 3) << 45 |
         (uint64_t{segment.present} & 1) << 47 | ((limit >> 16) & 0xf) << 48 |
         (uint64_t{segment.avl} & 1) << 52 | (uint64_t{segment.l} & 1) << 53 |
         (uint64_t{segment.db} & 1) << 54 | (uint64_t{segment.g} & 1) << 55 |
         ((base >> 24) & 0xff) << 56;
}

std::array<uint64_t, 6> bootGdt() {
  const kvm_segment tss = bootTssSegment();
  return {
      0,  // null
      0,  // unused: keeps code and data at the selectors boot.rst names
      encodeSegmentDescriptor(bootCodeSegment()),
      encodeSegmentDescriptor(bootDataSegment()),
      encodeSegmentDescriptor(tss),
      tss.base >> 32,  // a system descriptor's second slot holds base bits 63..32
  };
}

void writeLongModeTables(const GuestMemory& memory) {
  static_assert(sizeof(std::array<uint64_t, 6>) == layout::kGdtSize);
  static_assert(layout::kGdtAddr + layout::kGdtSize <= layout::kIdtAddr);
  memory.writeObject(layout::kGdtAddr, bootGdt());
  // An empty IDT: any exception before Linux installs its own is fatal, which is what we want.
  memory.writeObject(layout::kIdtAddr, std::array<uint64_t, 2>{});

  std::vector<uint64_t> pml4(kEntriesPerTable, 0);
  pml4[0] = layout::kPdptAddr | kPtePresent | kPteWritable;
  std::vector<uint64_t> pdpt(kEntriesPerTable, 0);
  std::vector<uint64_t> pd(kEntriesPerTable * kIdentityMappedGiB, 0);
  for (uint64_t gib = 0; gib < kIdentityMappedGiB; ++gib) {
    pdpt[gib] = (layout::kPdAddr + gib * kPageSize) | kPtePresent | kPteWritable;
  }
  for (uint64_t i = 0; i < pd.size(); ++i) {
    pd[i] = (i * kHugePageSize) | kPtePresent | kPteWritable | kPteHugePage;
  }
  auto asBytes = [](const std::vector<uint64_t>& table) {
    return std::span(reinterpret_cast<const uint8_t*>(table.data()), table.size() * 8);
  };
  memory.write(layout::kPml4Addr, asBytes(pml4));
  memory.write(layout::kPdptAddr, asBytes(pdpt));
  memory.write(layout::kPdAddr, asBytes(pd));
}

void setupLongModeSregs(kvm_sregs& sregs) {
  sregs.cr0 = kCr0ProtectionEnable | kCr0ExtensionType | kCr0NumericError | kCr0Paging;
  sregs.cr3 = layout::kPml4Addr;
  sregs.cr4 = kCr4Pae;
  sregs.efer = kEferLongModeEnable | kEferLongModeActive;

  sregs.cs = bootCodeSegment();
  const kvm_segment data = bootDataSegment();
  sregs.ds = data;
  sregs.es = data;
  sregs.fs = data;
  sregs.gs = data;
  sregs.ss = data;
  sregs.tr = bootTssSegment();

  sregs.gdt.base = layout::kGdtAddr;
  sregs.gdt.limit = static_cast<uint16_t>(layout::kGdtSize - 1);
  sregs.idt.base = layout::kIdtAddr;
  sregs.idt.limit = 0;
}

kvm_regs linuxEntryRegs(uint64_t entryPoint, uint64_t bootParamsAddress) {
  kvm_regs regs{};
  regs.rip = entryPoint;
  regs.rsi = bootParamsAddress;
  regs.rflags = 0x2;  // bit 1 is reserved and always set; interrupts stay off
  regs.rsp = layout::kBootStackTop;
  regs.rbp = layout::kBootStackTop;
  return regs;
}

}  // namespace clonevm::vmm
