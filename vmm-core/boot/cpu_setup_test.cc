#include "vmm-core/boot/cpu_setup.h"

#include <gtest/gtest.h>

#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {
namespace {

using layout::kGiB;
using layout::kMiB;

// Decodes an 8-byte descriptor independently of the encoder, bit by bit (Intel SDM 3.4.5).
struct DecodedDescriptor {
  uint64_t base;
  uint64_t limitBytes;
  uint8_t type, s, dpl, present, avl, l, db, g;
};

DecodedDescriptor decode(uint64_t d) {
  DecodedDescriptor out{};
  const uint64_t rawLimit = (d & 0xffff) | ((d >> 32) & 0xf0000);
  out.base = ((d >> 16) & 0xffffff) | (((d >> 56) & 0xff) << 24);
  out.type = (d >> 40) & 0xf;
  out.s = (d >> 44) & 1;
  out.dpl = (d >> 45) & 3;
  out.present = (d >> 47) & 1;
  out.avl = (d >> 52) & 1;
  out.l = (d >> 53) & 1;
  out.db = (d >> 54) & 1;
  out.g = (d >> 55) & 1;
  out.limitBytes = out.g ? (rawLimit << 12) | 0xfff : rawLimit;
  return out;
}

void expectDescriptorMatches(uint64_t descriptor, const kvm_segment& segment) {
  const DecodedDescriptor d = decode(descriptor);
  EXPECT_EQ(d.base, segment.base);
  EXPECT_EQ(d.limitBytes, segment.limit);
  EXPECT_EQ(d.type, segment.type);
  EXPECT_EQ(d.s, segment.s);
  EXPECT_EQ(d.dpl, segment.dpl);
  EXPECT_EQ(d.present, segment.present);
  EXPECT_EQ(d.avl, segment.avl);
  EXPECT_EQ(d.l, segment.l);
  EXPECT_EQ(d.db, segment.db);
  EXPECT_EQ(d.g, segment.g);
}

uint64_t readGdtSlot(const GuestMemory& memory, uint16_t selector) {
  return memory.readObject<uint64_t>(layout::kGdtAddr + (selector & ~7u));
}

// Walks the 4-level tables like the MMU: returns the physical address for `virt`.
uint64_t translate(const GuestMemory& memory, uint64_t cr3, uint64_t virt) {
  const uint64_t addressMask = 0x000ffffffffff000ull;
  const uint64_t pml4e = memory.readObject<uint64_t>(cr3 + ((virt >> 39) & 511) * 8);
  EXPECT_TRUE(pml4e & kPtePresent);
  const uint64_t pdpte =
      memory.readObject<uint64_t>((pml4e & addressMask) + ((virt >> 30) & 511) * 8);
  EXPECT_TRUE(pdpte & kPtePresent);
  EXPECT_FALSE(pdpte & kPteHugePage);
  const uint64_t pde = memory.readObject<uint64_t>((pdpte & addressMask) + ((virt >> 21) & 511) * 8);
  EXPECT_TRUE(pde & kPtePresent);
  EXPECT_TRUE(pde & kPteWritable);
  EXPECT_TRUE(pde & kPteHugePage);
  return (pde & 0x000fffffffe00000ull) | (virt & 0x1fffff);
}

TEST(CpuSetupTest, SegmentsAreTheFlatLongModeOnesBootRstAsksFor) {
  EXPECT_EQ(encodeSegmentDescriptor(bootCodeSegment()), 0x00af9b000000ffffull);
  EXPECT_EQ(encodeSegmentDescriptor(bootDataSegment()), 0x00cf93000000ffffull);
  EXPECT_EQ(encodeSegmentDescriptor(bootTssSegment()), 0x00008b0000000067ull);
  EXPECT_EQ(bootCodeSegment().selector, 0x10);
  EXPECT_EQ(bootDataSegment().selector, 0x18);
}

TEST(CpuSetupTest, GdtInMemoryMatchesTheSegmentRegisters) {
  auto memory = GuestMemory::create(16 * kMiB);
  writeLongModeTables(memory);
  kvm_sregs sregs{};
  setupLongModeSregs(sregs);

  EXPECT_EQ(readGdtSlot(memory, 0), 0u);
  EXPECT_EQ(readGdtSlot(memory, 0x08), 0u);
  expectDescriptorMatches(readGdtSlot(memory, sregs.cs.selector), sregs.cs);
  for (const kvm_segment* data : {&sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss}) {
    expectDescriptorMatches(readGdtSlot(memory, data->selector), *data);
  }
  expectDescriptorMatches(readGdtSlot(memory, sregs.tr.selector), sregs.tr);
  EXPECT_EQ(readGdtSlot(memory, sregs.tr.selector + 8), sregs.tr.base >> 32);
  // The whole GDT lies within its limit, and the IDT does not overlap it.
  EXPECT_EQ(sregs.gdt.base, layout::kGdtAddr);
  EXPECT_GE(sregs.gdt.limit + 1u, sregs.tr.selector + 16u);
  EXPECT_GE(sregs.idt.base, sregs.gdt.base + sregs.gdt.limit + 1);
  EXPECT_EQ(memory.readObject<uint64_t>(layout::kIdtAddr), 0u);
  EXPECT_EQ(memory.readObject<uint64_t>(layout::kIdtAddr + 8), 0u);
}

TEST(CpuSetupTest, SregsDescribeLongModeAndKeepKvmFields) {
  kvm_sregs sregs{};
  sregs.apic_base = 0xfee00900;
  sregs.cr8 = 0;
  sregs.cr2 = 0x1234;
  sregs.interrupt_bitmap[0] = 0x55;
  sregs.ldt.selector = 0;
  sregs.ldt.type = 2;
  sregs.ldt.present = 1;
  sregs.cr0 = 0x60000010;  // KVM's reset value: CD and NW set
  setupLongModeSregs(sregs);

  EXPECT_EQ(sregs.apic_base, 0xfee00900u);
  EXPECT_EQ(sregs.cr2, 0x1234u);
  EXPECT_EQ(sregs.interrupt_bitmap[0], 0x55u);
  EXPECT_EQ(sregs.ldt.type, 2);

  EXPECT_EQ(sregs.cr0 & (kCr0ProtectionEnable | kCr0Paging), kCr0ProtectionEnable | kCr0Paging);
  EXPECT_EQ(sregs.cr0 & 0x60000000, 0u) << "caches must be enabled (CD/NW clear)";
  EXPECT_EQ(sregs.cr3, layout::kPml4Addr);
  EXPECT_EQ(sregs.cr4, kCr4Pae);
  EXPECT_EQ(sregs.efer, kEferLongModeEnable | kEferLongModeActive);

  EXPECT_EQ(sregs.cs.selector, kBootCodeSelector);
  EXPECT_EQ(sregs.cs.l, 1);
  EXPECT_EQ(sregs.cs.db, 0);
  EXPECT_EQ(sregs.cs.present, 1);
  EXPECT_EQ(sregs.cs.type & 0x9, 0x9) << "code segment, accessed";
  for (const kvm_segment* data : {&sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss}) {
    EXPECT_EQ(data->selector, kBootDataSelector);
    EXPECT_EQ(data->type, 0x3) << "read/write data, accessed";
    EXPECT_EQ(data->limit, 0xffffffffu);
    EXPECT_EQ(data->s, 1);
  }
  EXPECT_EQ(sregs.tr.selector, kBootTssSelector);
  EXPECT_EQ(sregs.tr.type, 0xb) << "busy 64-bit TSS, as VMX entry requires";
  EXPECT_EQ(sregs.tr.s, 0);
  EXPECT_EQ(sregs.gdt.limit, layout::kGdtSize - 1);
  EXPECT_EQ(sregs.idt.base, layout::kIdtAddr);
}

TEST(CpuSetupTest, PageTablesIdentityMapFourGiBWithTwoMiBPages) {
  auto memory = GuestMemory::create(16 * kMiB);
  writeLongModeTables(memory);

  EXPECT_EQ(memory.readObject<uint64_t>(layout::kPml4Addr),
            layout::kPdptAddr | kPtePresent | kPteWritable);
  EXPECT_EQ(memory.readObject<uint64_t>(layout::kPml4Addr + 8), 0u);
  for (uint64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(memory.readObject<uint64_t>(layout::kPdptAddr + i * 8),
              (layout::kPdAddr + i * 4096) | kPtePresent | kPteWritable);
  }
  EXPECT_EQ(memory.readObject<uint64_t>(layout::kPdptAddr + 4 * 8), 0u);
  EXPECT_EQ(memory.readObject<uint64_t>(layout::kPdAddr), 0x83u);
  EXPECT_EQ(memory.readObject<uint64_t>(layout::kPdAddr + 2047 * 8), 0xffe00083u);

  for (uint64_t address : {uint64_t{0}, layout::kBootParamsAddr, layout::kCmdlineAddr,
                           layout::kHighMemStart + 0x200, 16 * kMiB + 0x1234, 3 * kGiB - 1,
                           layout::kEcamStart, 4 * kGiB - 1}) {
    EXPECT_EQ(translate(memory, layout::kPml4Addr, address), address) << std::hex << address;
  }
}

TEST(CpuSetupTest, EntryRegisters) {
  const kvm_regs regs = linuxEntryRegs(0x100200, layout::kBootParamsAddr);
  EXPECT_EQ(regs.rip, 0x100200u);
  EXPECT_EQ(regs.rsi, layout::kBootParamsAddr);
  EXPECT_EQ(regs.rflags, 0x2u);
  EXPECT_EQ(regs.rsp, layout::kBootStackTop);
  EXPECT_EQ(regs.rax, 0u);
}

}  // namespace
}  // namespace clonevm::vmm
