#include "vmm-core/boot/linux_loader.h"

#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <span>

#include "common/error.h"
#include "common/unique_fd.h"
#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {

// The offsets the boot protocol fixes; the kernel header is the ABI, so pin our view of it.
static_assert(sizeof(boot_params) == 4096);
static_assert(offsetof(boot_params, acpi_rsdp_addr) == 0x070);
static_assert(offsetof(boot_params, e820_entries) == 0x1e8);
static_assert(offsetof(boot_params, hdr) == 0x1f1);
static_assert(offsetof(boot_params, e820_table) == 0x2d0);
static_assert(offsetof(boot_params, hdr) + offsetof(setup_header, boot_flag) == 0x1fe);
static_assert(offsetof(boot_params, hdr) + offsetof(setup_header, header) == 0x202);
static_assert(offsetof(boot_params, hdr) + offsetof(setup_header, cmd_line_ptr) == 0x228);
static_assert(offsetof(boot_params, hdr) + offsetof(setup_header, init_size) == 0x260);
static_assert(sizeof(boot_e820_entry) == 20);

namespace {

constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kFourGiB = 4 * layout::kGiB;
constexpr uint64_t kSetupHeaderOffset = 0x1f1;
constexpr uint64_t kSetupHeaderJumpOffset = 0x201;  // its byte + 0x202 = end of the header
constexpr uint64_t kSectorSize = 512;
constexpr uint16_t kBootFlag = 0xaa55;
constexpr uint32_t kHdrSMagic = 0x53726448;  // "HdrS"
constexpr uint16_t kMinProtocolFor64BitEntry = 0x020c;
constexpr uint64_t kEntry64Offset = 0x200;  // startup_64 is 0x200 past the protected-mode start
constexpr uint8_t kLoaderTypeUndefined = 0xff;
// The setup code's heap would end at 0xe000 in its segment; boot.rst asks for that minus 0x200.
constexpr uint16_t kHeapEndPtr = 0xe000 - 0x200;

// What we promise in a zero page built for an ELF vmlinux, which carries no setup header.
constexpr uint16_t kElfClaimedProtocol = 0x020f;
constexpr uint32_t kElfCmdlineSize = 2047;  // x86 COMMAND_LINE_SIZE minus the NUL
constexpr uint32_t kElfInitrdAddrMax = 0x7fffffff;
constexpr uint32_t kElfKernelAlignment = 0x1000000;

uint64_t alignUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) & ~(alignment - 1);
}
uint64_t alignDown(uint64_t value, uint64_t alignment) { return value & ~(alignment - 1); }

std::string protocolText(uint16_t version) {
  return fmt::format("{}.{:02}", version >> 8, version & 0xff);
}

// Reads exactly dest.size() bytes from the start of `fd`.
void readFully(int fd, std::span<uint8_t> dest, const char* step, const std::string& path) {
  size_t done = 0;
  while (done < dest.size()) {
    ssize_t n = CLONE_SYSCALL(::pread(fd, dest.data() + done, dest.size() - done,
                                      static_cast<off_t>(done)),
                              step, path);
    require(n > 0, "{} {}: file shrank while reading ({} of {} bytes)", step, path, done,
            dest.size());
    done += static_cast<size_t>(n);
  }
}

struct OpenFile {
  UniqueFd fd;
  uint64_t size;
};

OpenFile openRegularFile(const std::filesystem::path& path, const char* what) {
  const std::string name = path.string();
  const std::string step = fmt::format("open {}", what);
  OpenFile file{UniqueFd(CLONE_SYSCALL(::open(name.c_str(), O_RDONLY | O_CLOEXEC), step, name)),
                0};
  struct stat info {};
  CLONE_SYSCALL(::fstat(file.fd.get(), &info), fmt::format("stat {}", what), name);
  require(S_ISREG(info.st_mode), "{} {} is not a regular file", what, name);
  file.size = static_cast<uint64_t>(info.st_size);
  require(file.size > 0, "{} {} is empty", what, name);
  return file;
}

std::vector<uint8_t> readKernelImage(const std::filesystem::path& path) {
  OpenFile file = openRegularFile(path, "kernel image");
  std::vector<uint8_t> bytes(file.size);
  readFully(file.fd.get(), bytes, "read kernel image", path.string());
  return bytes;
}

template <typename T>
T loadFrom(const std::vector<uint8_t>& bytes, uint64_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

bool isElf(const std::vector<uint8_t>& image) {
  return image.size() >= SELFMAG && std::memcmp(image.data(), ELFMAG, SELFMAG) == 0;
}

bool isBzImage(const std::vector<uint8_t>& image) {
  constexpr uint64_t kBootFlagOffset = kSetupHeaderOffset + offsetof(setup_header, boot_flag);
  constexpr uint64_t kMagicOffset = kSetupHeaderOffset + offsetof(setup_header, header);
  return image.size() >= kMagicOffset + sizeof(uint32_t) &&
         loadFrom<uint16_t>(image, kBootFlagOffset) == kBootFlag &&
         loadFrom<uint32_t>(image, kMagicOffset) == kHdrSMagic;
}

uint64_t lowRamEnd(const GuestMemory& memory) {
  const MemoryRegion& low = memory.regions().front();
  return low.guestAddress == 0 ? low.size : 0;
}

// Where the kernel went and what boot_params must say about it; filled by the format loaders.
struct LoadedKernel {
  KernelFormat format;
  uint64_t entryPoint;
  uint64_t start;
  uint64_t end;  // including the room it needs to decompress and run (init_size / bss)
  boot_params params{};
  uint32_t cmdlineLimit;   // longest command line the kernel accepts, without the NUL
  uint32_t initrdAddrMax;  // highest address the initrd may occupy
};

LoadedKernel loadBzImage(const GuestMemory& memory, const std::vector<uint8_t>& image,
                         const std::string& path) {
  // The header's own length is in it: copy no more than it declares, no more than we know.
  const uint64_t headerEnd = 0x202 + image[kSetupHeaderJumpOffset];
  const uint64_t headerLength =
      std::min<uint64_t>(headerEnd - kSetupHeaderOffset, sizeof(setup_header));
  require(kSetupHeaderOffset + headerLength <= image.size(),
          "bzImage {} is truncated: the setup header ends at {:#x} but the file has {} bytes", path,
          kSetupHeaderOffset + headerLength, image.size());
  setup_header header{};
  std::memcpy(&header, image.data() + kSetupHeaderOffset, headerLength);

  require(header.version >= kMinProtocolFor64BitEntry,
          "bzImage {} speaks boot protocol {}, but the 64-bit entry needs {} or later", path,
          protocolText(header.version), protocolText(kMinProtocolFor64BitEntry));
  require((header.xloadflags & XLF_KERNEL_64) != 0,
          "bzImage {} is a 32-bit only kernel (xloadflags lacks XLF_KERNEL_64); Clone boots "
          "64-bit kernels",
          path);

  const uint64_t setupSectors = header.setup_sects == 0 ? 4 : header.setup_sects;
  const uint64_t setupSize = (setupSectors + 1) * kSectorSize;
  require(setupSize < image.size(),
          "bzImage {} is truncated: setup_sects={} puts the kernel at offset {:#x} but the file "
          "has {} bytes",
          path, header.setup_sects, setupSize, image.size());
  const uint64_t payloadSize = image.size() - setupSize;
  const uint64_t declaredPayload = uint64_t{header.syssize} * 16;
  require(declaredPayload <= payloadSize,
          "bzImage {} is truncated: syssize declares {} bytes of kernel but the file holds {}",
          path, declaredPayload, payloadSize);

  const uint64_t alignment = header.kernel_alignment;
  require(alignment != 0 && (alignment & (alignment - 1)) == 0,
          "bzImage {} has an invalid kernel_alignment {:#x}", path, alignment);
  const uint64_t initSize = header.init_size;
  require(initSize != 0, "bzImage {} declares init_size 0", path);

  // The decompressor runs from max(load address aligned up, pref_address) if relocatable, from
  // pref_address otherwise, and needs init_size bytes there (arch/x86/boot/compressed/head_64.S).
  const uint64_t loadAddress = layout::kHighMemStart;
  const uint64_t preferred = header.pref_address != 0 ? header.pref_address : loadAddress;
  const uint64_t runStart = header.relocatable_kernel != 0
                                ? std::max(alignUp(loadAddress, alignment), preferred)
                                : preferred;
  // Compared without sums: pref_address comes from the file and could wrap around.
  const uint64_t ramEnd = lowRamEnd(memory);
  require(payloadSize <= ramEnd - loadAddress && runStart <= ramEnd &&
              initSize <= ramEnd - runStart,
          "guest memory is too small for kernel {}: it needs init_size {:#x} bytes from {:#x} "
          "and {:#x} bytes at {:#x}, but low RAM ends at {:#x}",
          path, initSize, runStart, payloadSize, loadAddress, ramEnd);
  const uint64_t kernelEnd = std::max(loadAddress + payloadSize, runStart + initSize);

  memory.write(loadAddress, std::span(image).subspan(setupSize));

  LoadedKernel kernel{.format = KernelFormat::kBzImage,
                      .entryPoint = loadAddress + kEntry64Offset,
                      .start = loadAddress,
                      .end = kernelEnd};
  kernel.params.hdr = header;
  kernel.params.hdr.code32_start = static_cast<uint32_t>(loadAddress);
  kernel.cmdlineLimit = header.cmdline_size;
  kernel.initrdAddrMax = header.initrd_addr_max;
  return kernel;
}

LoadedKernel loadElfVmlinux(const GuestMemory& memory, const std::vector<uint8_t>& image,
                            const std::string& path) {
  require(image.size() <= EI_CLASS || image[EI_CLASS] != ELFCLASS32,
          "ELF kernel {} is 32-bit; Clone boots 64-bit kernels", path);
  require(image.size() >= sizeof(Elf64_Ehdr) && image[EI_CLASS] == ELFCLASS64,
          "ELF kernel {} is not a complete 64-bit ELF file", path);
  const auto elf = loadFrom<Elf64_Ehdr>(image, 0);
  require(elf.e_ident[EI_DATA] == ELFDATA2LSB && elf.e_machine == EM_X86_64,
          "ELF kernel {} is not a little-endian x86-64 image", path);
  require(elf.e_type == ET_EXEC, "ELF kernel {} is not an executable (e_type {})", path,
          elf.e_type);
  require(elf.e_phentsize == sizeof(Elf64_Phdr) && elf.e_phnum > 0,
          "ELF kernel {} has no usable program headers", path);
  const uint64_t tableSize = uint64_t{elf.e_phnum} * sizeof(Elf64_Phdr);
  require(elf.e_phoff <= image.size() && tableSize <= image.size() - elf.e_phoff,
          "ELF kernel {} is truncated: program headers end past the file", path);

  const uint64_t ramEnd = lowRamEnd(memory);
  LoadedKernel kernel{.format = KernelFormat::kElfVmlinux, .start = UINT64_MAX, .end = 0};
  std::optional<uint64_t> entry;
  for (uint16_t i = 0; i < elf.e_phnum; ++i) {
    const auto segment = loadFrom<Elf64_Phdr>(image, elf.e_phoff + i * sizeof(Elf64_Phdr));
    if (segment.p_type != PT_LOAD || segment.p_memsz == 0) continue;
    require(segment.p_filesz <= segment.p_memsz,
            "ELF kernel {}: segment {} has more file bytes than memory bytes", path, i);
    require(segment.p_offset <= image.size() && segment.p_filesz <= image.size() - segment.p_offset,
            "ELF kernel {} is truncated: segment {} ends past the file", path, i);
    // Below 1 MiB live the zero page, command line and page tables.
    require(segment.p_paddr >= layout::kHighMemStart,
            "ELF kernel {}: segment {} loads at {:#x}, below {:#x}", path, i, segment.p_paddr,
            layout::kHighMemStart);
    require(segment.p_paddr < ramEnd && segment.p_memsz <= ramEnd - segment.p_paddr,
            "guest memory is too small for kernel {}: segment {} needs RAM up to {:#x} but low "
            "RAM ends at {:#x}",
            path, i, segment.p_paddr + segment.p_memsz, ramEnd);

    memory.write(segment.p_paddr, std::span(image).subspan(segment.p_offset, segment.p_filesz));
    auto bss = memory.slice(segment.p_paddr + segment.p_filesz,
                            segment.p_memsz - segment.p_filesz);
    std::fill(bss.begin(), bss.end(), uint8_t{0});

    kernel.start = std::min(kernel.start, segment.p_paddr);
    kernel.end = std::max(kernel.end, segment.p_paddr + segment.p_memsz);
    // e_entry is a virtual address for some builds; the vCPU starts with paging = identity.
    if (!entry && elf.e_entry >= segment.p_vaddr &&
        elf.e_entry - segment.p_vaddr < segment.p_memsz) {
      entry = elf.e_entry - segment.p_vaddr + segment.p_paddr;
    } else if (!entry && elf.e_entry >= segment.p_paddr &&
               elf.e_entry - segment.p_paddr < segment.p_memsz) {
      entry = elf.e_entry;
    }
  }
  require(kernel.end != 0, "ELF kernel {} has no loadable segments", path);
  require(entry.has_value(), "ELF kernel {}: entry point {:#x} is outside its loaded segments",
          path, elf.e_entry);
  kernel.entryPoint = *entry;

  // No setup header in a vmlinux: build the fields the kernel reads from scratch.
  setup_header& header = kernel.params.hdr;
  header.boot_flag = kBootFlag;
  header.header = kHdrSMagic;
  header.version = kElfClaimedProtocol;
  header.kernel_alignment = kElfKernelAlignment;
  header.cmdline_size = kElfCmdlineSize;
  header.initrd_addr_max = kElfInitrdAddrMax;
  kernel.cmdlineLimit = kElfCmdlineSize;
  kernel.initrdAddrMax = kElfInitrdAddrMax;
  return kernel;
}

void writeCmdline(const GuestMemory& memory, const std::string& cmdline, uint32_t kernelLimit) {
  const uint64_t limit = std::min<uint64_t>(kernelLimit, layout::kCmdlineMax - 1);
  require(cmdline.size() <= limit,
          "kernel command line is {} bytes; the kernel accepts at most {}", cmdline.size(), limit);
  require(cmdline.find('\0') == std::string::npos, "kernel command line contains a NUL byte");
  auto dest = memory.slice(layout::kCmdlineAddr, cmdline.size() + 1);
  std::memcpy(dest.data(), cmdline.data(), cmdline.size());
  dest[cmdline.size()] = 0;
}

struct PlacedInitrd {
  uint64_t address;
  uint64_t size;
};

// As high as possible (page aligned) below every limit, and above the kernel.
PlacedInitrd loadInitrd(const GuestMemory& memory, const std::filesystem::path& path,
                        const LoadedKernel& kernel) {
  OpenFile file = openRegularFile(path, "initrd");
  const uint64_t ceiling = std::min({uint64_t{kernel.initrdAddrMax} + 1, lowRamEnd(memory),
                                     kFourGiB});
  const uint64_t floor = alignUp(kernel.end, kPageSize);
  const uint64_t room = ceiling > floor ? alignDown(ceiling, kPageSize) - floor : 0;
  require(file.size <= room,
          "initrd {} is {} bytes but only {} bytes of RAM are free for it between the kernel end "
          "{:#x} and {:#x}",
          path.string(), file.size, room, floor, ceiling);
  const uint64_t address = alignDown(ceiling - file.size, kPageSize);
  readFully(file.fd.get(), memory.slice(address, file.size), "read initrd", path.string());
  return {address, file.size};
}

}  // namespace

std::vector<boot_e820_entry> buildE820Map(const GuestMemory& memory) {
  std::vector<boot_e820_entry> map;
  const uint64_t lowEnd = lowRamEnd(memory);
  require(lowEnd > layout::kHighMemStart, "guest memory must extend past {:#x}",
          layout::kHighMemStart);
  map.push_back({0, layout::kEbdaStart, kE820Ram});
  // EBDA, VGA hole and BIOS area: our ACPI tables live here, Linux must not use it as RAM.
  map.push_back({layout::kEbdaStart, layout::kHighMemStart - layout::kEbdaStart, kE820Reserved});
  map.push_back({layout::kHighMemStart, lowEnd - layout::kHighMemStart, kE820Ram});
  // Linux only trusts MMCONFIG (the MCFG window) when firmware reserves it.
  map.push_back({layout::kEcamStart, layout::kEcamSize, kE820Reserved});
  for (const MemoryRegion& region : memory.regions()) {
    if (region.guestAddress >= kFourGiB) map.push_back({region.guestAddress, region.size, kE820Ram});
  }
  std::sort(map.begin(), map.end(),
            [](const boot_e820_entry& a, const boot_e820_entry& b) { return a.addr < b.addr; });
  return map;
}

LinuxBootInfo loadLinux(const GuestMemory& memory, const LinuxBootConfig& config) {
  const std::string path = config.kernelPath.string();
  const std::vector<uint8_t> image = readKernelImage(config.kernelPath);

  LoadedKernel kernel;
  if (isElf(image)) {
    kernel = loadElfVmlinux(memory, image, path);
  } else if (isBzImage(image)) {
    kernel = loadBzImage(memory, image, path);
  } else {
    throw Error(fmt::format(
        "kernel image {} is neither a bzImage (boot flag 0xAA55 and \"HdrS\" at 0x202) nor an "
        "ELF vmlinux",
        path));
  }

  boot_params& params = kernel.params;
  setup_header& header = params.hdr;
  header.type_of_loader = kLoaderTypeUndefined;
  header.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
  header.heap_end_ptr = kHeapEndPtr;

  writeCmdline(memory, config.cmdline, kernel.cmdlineLimit);
  header.cmd_line_ptr = static_cast<uint32_t>(layout::kCmdlineAddr);
  params.ext_cmd_line_ptr = static_cast<uint32_t>(layout::kCmdlineAddr >> 32);

  PlacedInitrd initrd{0, 0};
  if (config.initrdPath) {
    initrd = loadInitrd(memory, *config.initrdPath, kernel);
    header.ramdisk_image = static_cast<uint32_t>(initrd.address);
    header.ramdisk_size = static_cast<uint32_t>(initrd.size);
    params.ext_ramdisk_image = static_cast<uint32_t>(initrd.address >> 32);
    params.ext_ramdisk_size = static_cast<uint32_t>(initrd.size >> 32);
  }

  params.acpi_rsdp_addr = config.acpiRsdpAddress;

  const std::vector<boot_e820_entry> e820 = buildE820Map(memory);
  require(e820.size() <= E820_MAX_ENTRIES_ZEROPAGE, "e820 map has {} entries, the zero page holds {}",
          e820.size(), E820_MAX_ENTRIES_ZEROPAGE);
  std::copy(e820.begin(), e820.end(), params.e820_table);
  params.e820_entries = static_cast<uint8_t>(e820.size());

  memory.writeObject(layout::kBootParamsAddr, params);

  return LinuxBootInfo{.format = kernel.format,
                       .entryPoint = kernel.entryPoint,
                       .bootParamsAddress = layout::kBootParamsAddr,
                       .kernelStart = kernel.start,
                       .kernelEnd = kernel.end,
                       .initrdAddress = initrd.address,
                       .initrdSize = initrd.size,
                       .bootProtocolVersion = header.version};
}

}  // namespace clonevm::vmm
