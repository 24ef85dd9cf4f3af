#pragma once
// The ACPI tables that describe a Clone VM to the guest: RSDP, XSDT, FADT (with FACS and
// DSDT), MADT and MCFG, laid out from layout::kAcpiTablesAddr. The FADT describes real
// (not hardware-reduced) fixed hardware: PM1a event/control blocks, the PM timer, SCI and the
// 0xCF9 reset register, all at the ports in layout.h.

#include <cstdint>
#include <string>
#include <vector>

#include "vmm-core/arch/layout.h"
#include "vmm-core/memory/guest_memory.h"

namespace clonevm::vmm {

struct AcpiConfig {
  uint32_t vcpuCount = 1;  // local APIC ids 0..vcpuCount-1
  // The 64-bit PCI MMIO window: above RAM and 4 GiB. Size 0 leaves it out of the DSDT.
  uint64_t pciMmio64Start = 0;
  uint64_t pciMmio64Size = layout::kPciMmio64Size;
};

// Local APIC ids are 8-bit in the MADT entries we emit, and 0xff means "all".
inline constexpr uint32_t kAcpiMaxVcpus = 255;

struct AcpiTable {
  std::string signature;  // "RSD PTR " for the RSDP, else the 4-character table signature
  uint64_t address;
  std::vector<uint8_t> bytes;
};

struct AcpiTables {
  uint64_t rsdpAddress;
  uint64_t endAddress;  // one past the last table byte
  std::vector<AcpiTable> tables;
};

// Builds every table with its final guest address, without touching guest memory.
AcpiTables buildAcpiTables(const AcpiConfig& config);

// Builds the tables and writes them into guest memory; returns the RSDP address for
// boot_params.acpi_rsdp_addr. The RSDP sits at layout::kAcpiTablesAddr (0xE0000), so a kernel
// scanning the BIOS area finds it as well.
uint64_t writeAcpiTables(const GuestMemory& memory, const AcpiConfig& config);

// The DSDT definition block alone (header included), for tests and tools.
std::vector<uint8_t> buildDsdt(const AcpiConfig& config);

// Sum of all bytes modulo 256; a valid ACPI table sums to zero.
uint8_t acpiChecksum(const std::vector<uint8_t>& bytes, size_t offset = 0,
                     size_t length = SIZE_MAX);

}  // namespace clonevm::vmm
