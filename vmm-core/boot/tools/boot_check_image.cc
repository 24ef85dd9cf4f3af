// Lays out a guest exactly as Clone does (ACPI tables, Linux loader, long-mode tables and the
// vCPU values from cpu_setup) and dumps it as files QEMU's generic loader can place, plus a
// 128 KiB BIOS image holding 0xE0000..0xFFFFF (the ACPI tables) and the entry stub. Used by
// qemu_boot_check.sh to boot a real kernel through our boot path without /dev/kvm.
//
// usage: boot_check_image OUTDIR STUB_BIN KERNEL INITRD MEMORY_MIB VCPUS CMDLINE

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "common/error.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/boot/acpi/acpi_tables.h"
#include "vmm-core/boot/cpu_setup.h"
#include "vmm-core/boot/linux_loader.h"

using namespace clonevm;
using namespace clonevm::vmm;

namespace {

constexpr uint64_t kStubBlock = 0x6000;  // see boot_check_stub.S
constexpr uint64_t kBiosBase = 0xe0000;
constexpr uint64_t kBiosSize = 0x20000;
constexpr uint64_t kStubOffset = 0x10000;  // 0xF0000, i.e. 0xFFFF0000 through the ROM alias

#pragma pack(push, 1)
struct StubBlock {
  uint16_t gdtLimit;
  uint32_t gdtBase;
  uint16_t pad0;
  uint16_t idtLimit;
  uint32_t idtBase;
  uint16_t pad1;
  uint32_t cr0, cr3, cr4, efer;
  uint32_t farJumpOffset;
  uint16_t codeSelector;
  uint16_t dataSelector;
  uint64_t rip, rsi, rsp;
};
#pragma pack(pop)
static_assert(offsetof(StubBlock, cr0) == 0x10 && offsetof(StubBlock, codeSelector) == 0x24 &&
              offsetof(StubBlock, rip) == 0x28 && sizeof(StubBlock) == 0x40);

void writeFile(const std::string& path, std::span<const uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  require(out.good(), "cannot write {}", path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr,
                 "usage: %s OUTDIR STUB_BIN KERNEL INITRD MEMORY_MIB VCPUS CMDLINE\n", argv[0]);
    return 2;
  }
  try {
    const std::string out = argv[1];
    const uint64_t memorySize = std::stoull(argv[5]) * layout::kMiB;
    const uint32_t vcpus = static_cast<uint32_t>(std::stoul(argv[6]));
    auto memory = GuestMemory::create(memorySize);

    const uint64_t window64 = std::max<uint64_t>(64 * layout::kGiB, memory.endAddress());
    const uint64_t rsdp =
        writeAcpiTables(memory, {.vcpuCount = vcpus, .pciMmio64Start = window64});
    const LinuxBootInfo boot = loadLinux(memory, {.kernelPath = argv[3],
                                                  .initrdPath = std::filesystem::path(argv[4]),
                                                  .cmdline = argv[7],
                                                  .acpiRsdpAddress = rsdp});
    writeLongModeTables(memory);

    kvm_sregs sregs{};
    setupLongModeSregs(sregs);
    const kvm_regs regs = linuxEntryRegs(boot.entryPoint, boot.bootParamsAddress);
    memory.writeObject(kStubBlock, StubBlock{
        .gdtLimit = sregs.gdt.limit, .gdtBase = static_cast<uint32_t>(sregs.gdt.base),
        .idtLimit = sregs.idt.limit, .idtBase = static_cast<uint32_t>(sregs.idt.base),
        .cr0 = static_cast<uint32_t>(sregs.cr0), .cr3 = static_cast<uint32_t>(sregs.cr3),
        .cr4 = static_cast<uint32_t>(sregs.cr4), .efer = static_cast<uint32_t>(sregs.efer),
        .codeSelector = sregs.cs.selector, .dataSelector = sregs.ds.selector,
        .rip = regs.rip, .rsi = regs.rsi, .rsp = regs.rsp});

    writeFile(out + "/low.bin", memory.slice(0, layout::kEbdaStart));
    // The kernel: from its start to the end of what the file could have filled.
    const uint64_t kernelBytes =
        std::min(std::filesystem::file_size(argv[3]), boot.kernelEnd - boot.kernelStart);
    writeFile(out + "/kernel.bin", memory.slice(boot.kernelStart, kernelBytes));
    writeFile(out + "/initrd.bin", memory.slice(boot.initrdAddress, boot.initrdSize));

    std::vector<uint8_t> bios(kBiosSize);
    memory.read(kBiosBase, bios);
    std::ifstream stubFile(argv[2], std::ios::binary);
    const std::vector<uint8_t> stub((std::istreambuf_iterator<char>(stubFile)), {});
    require(!stub.empty() && kStubOffset + stub.size() < kBiosSize - 16, "bad stub {}", argv[2]);
    for (size_t i = 0; i < stub.size(); ++i) {
      require(bios[kStubOffset + i] == 0, "the stub would overwrite guest data at {:#x}",
              kBiosBase + kStubOffset + i);
      bios[kStubOffset + i] = stub[i];
    }
    // Reset vector (CS base 0xFFFF0000, IP 0xFFF0): jmp near to IP 0x0000, the stub.
    const uint8_t resetJump[] = {0xe9, 0x0d, 0x00};
    std::copy(std::begin(resetJump), std::end(resetJump), bios.begin() + kBiosSize - 16);
    writeFile(out + "/bios.bin", bios);

    std::ofstream args(out + "/loader-args");
    args << fmt::format(
        "-device loader,file={0}/low.bin,addr=0,force-raw=on "
        "-device loader,file={0}/kernel.bin,addr={1:#x},force-raw=on "
        "-device loader,file={0}/initrd.bin,addr={2:#x},force-raw=on -bios {0}/bios.bin\n",
        out, boot.kernelStart, boot.initrdAddress);
    std::printf("entry %#llx, kernel %#llx..%#llx, initrd %#llx+%#llx, rsdp %#llx\n",
                static_cast<unsigned long long>(boot.entryPoint),
                static_cast<unsigned long long>(boot.kernelStart),
                static_cast<unsigned long long>(boot.kernelEnd),
                static_cast<unsigned long long>(boot.initrdAddress),
                static_cast<unsigned long long>(boot.initrdSize),
                static_cast<unsigned long long>(rsdp));
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "boot_check_image: %s\n", error.what());
    return 1;
  }
}
