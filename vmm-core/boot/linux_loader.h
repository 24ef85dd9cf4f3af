#pragma once
// Loads a Linux kernel (bzImage or ELF vmlinux), its initrd and command line into guest memory
// and builds the boot_params "zero page" for the 64-bit boot protocol
// (Documentation/arch/x86/boot.rst). The vCPU state that goes with it is in cpu_setup.h.

#include <asm/bootparam.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "vmm-core/memory/guest_memory.h"

namespace clonevm::vmm {

// e820 entry types (the values of the BIOS INT 15h/E820h interface).
inline constexpr uint32_t kE820Ram = 1;
inline constexpr uint32_t kE820Reserved = 2;

struct LinuxBootConfig {
  std::filesystem::path kernelPath;
  std::optional<std::filesystem::path> initrdPath;
  std::string cmdline;
  // Guest physical address of the ACPI RSDP (from writeAcpiTables); 0 leaves the kernel to
  // scan the BIOS area for it.
  uint64_t acpiRsdpAddress = 0;
};

enum class KernelFormat { kBzImage, kElfVmlinux };

struct LinuxBootInfo {
  KernelFormat format;
  uint64_t entryPoint;         // 64-bit entry, guest physical: goes to RIP
  uint64_t bootParamsAddress;  // the zero page: goes to RSI
  uint64_t kernelStart;        // first byte the kernel occupies (load address)
  uint64_t kernelEnd;          // one past the last byte the kernel may use while booting
  uint64_t initrdAddress;      // 0 when there is no initrd
  uint64_t initrdSize;
  uint16_t bootProtocolVersion;  // e.g. 0x020f; for an ELF, the version we claim in the zero page
};

// Loads the kernel, initrd and command line and writes boot_params at layout::kBootParamsAddr.
// Throws clonevm::Error (SystemError for I/O) with one clear message for any bad input.
LinuxBootInfo loadLinux(const GuestMemory& memory, const LinuxBootConfig& config);

// The e820 map Linux gets for `memory`: low RAM, the EBDA/BIOS hole, RAM from 1 MiB, the PCIe
// ECAM window (reserved so Linux trusts MMCONFIG) and RAM above 4 GiB. Sorted by address.
std::vector<boot_e820_entry> buildE820Map(const GuestMemory& memory);

}  // namespace clonevm::vmm
