#include "vmm-core/boot/linux_loader.h"

#include <elf.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/boot/boot_test_util.h"

namespace clonevm::vmm {
namespace {

using layout::kGiB;
using layout::kMiB;
using ::testing::HasSubstr;
using testing::TempDir;
using testing::writeFile;

constexpr uint64_t kSetupSectors = 4;
constexpr uint64_t kSetupBytes = (kSetupSectors + 1) * 512;

// What a synthetic bzImage declares; each test bends one field.
struct BzImageSpec {
  uint16_t version = 0x020f;
  uint16_t xloadflags = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G;
  uint8_t setupSects = kSetupSectors;
  uint64_t payloadBytes = 64 * 1024;
  std::optional<uint32_t> syssize;  // default: payloadBytes / 16
  uint64_t prefAddress = 16 * kMiB;
  uint32_t kernelAlignment = 2 * kMiB;
  uint8_t relocatable = 1;
  uint32_t initSize = 8 * kMiB;
  uint32_t cmdlineSize = 2047;
  uint32_t initrdAddrMax = 0x7fffffff;
};

uint8_t payloadByte(uint64_t i) { return static_cast<uint8_t>(i * 7 + 3); }

std::vector<uint8_t> makeBzImage(const BzImageSpec& spec) {
  std::vector<uint8_t> image(kSetupBytes + spec.payloadBytes, 0);
  setup_header header{};
  header.setup_sects = spec.setupSects;
  header.syssize = spec.syssize.value_or(static_cast<uint32_t>(spec.payloadBytes / 16));
  header.boot_flag = 0xaa55;
  header.jump = 0x66eb;  // "jmp short": the header's length byte is its high half, patched below
  header.header = 0x53726448;
  header.version = spec.version;
  header.loadflags = LOADED_HIGH;
  header.initrd_addr_max = spec.initrdAddrMax;
  header.kernel_alignment = spec.kernelAlignment;
  header.relocatable_kernel = spec.relocatable;
  header.xloadflags = spec.xloadflags;
  header.cmdline_size = spec.cmdlineSize;
  header.pref_address = spec.prefAddress;
  header.init_size = spec.initSize;
  std::memcpy(image.data() + 0x1f1, &header, sizeof(header));
  image[0x201] = static_cast<uint8_t>(0x1f1 + sizeof(setup_header) - 0x202);
  for (uint64_t i = 0; i < spec.payloadBytes; ++i) image[kSetupBytes + i] = payloadByte(i);
  return image;
}

struct ElfSegment {
  uint64_t vaddr;
  uint64_t paddr;
  std::vector<uint8_t> data;
  uint64_t memsz;
};

std::vector<uint8_t> makeElf(const std::vector<ElfSegment>& segments, uint64_t entry,
                             unsigned char elfClass = ELFCLASS64) {
  Elf64_Ehdr header{};
  std::memcpy(header.e_ident, ELFMAG, SELFMAG);
  header.e_ident[EI_CLASS] = elfClass;
  header.e_ident[EI_DATA] = ELFDATA2LSB;
  header.e_ident[EI_VERSION] = EV_CURRENT;
  header.e_type = ET_EXEC;
  header.e_machine = EM_X86_64;
  header.e_version = EV_CURRENT;
  header.e_entry = entry;
  header.e_phoff = sizeof(Elf64_Ehdr);
  header.e_ehsize = sizeof(Elf64_Ehdr);
  header.e_phentsize = sizeof(Elf64_Phdr);
  header.e_phnum = static_cast<uint16_t>(segments.size());

  std::vector<uint8_t> file(sizeof(Elf64_Ehdr) + segments.size() * sizeof(Elf64_Phdr));
  std::memcpy(file.data(), &header, sizeof(header));
  for (size_t i = 0; i < segments.size(); ++i) {
    Elf64_Phdr phdr{};
    phdr.p_type = PT_LOAD;
    phdr.p_flags = PF_R | PF_X;
    phdr.p_offset = file.size();
    phdr.p_vaddr = segments[i].vaddr;
    phdr.p_paddr = segments[i].paddr;
    phdr.p_filesz = segments[i].data.size();
    phdr.p_memsz = segments[i].memsz;
    phdr.p_align = 0x1000;
    std::memcpy(file.data() + sizeof(Elf64_Ehdr) + i * sizeof(Elf64_Phdr), &phdr, sizeof(phdr));
    file.insert(file.end(), segments[i].data.begin(), segments[i].data.end());
  }
  return file;
}

std::vector<uint8_t> pattern(size_t size, uint8_t seed) {
  std::vector<uint8_t> bytes(size);
  for (size_t i = 0; i < size; ++i) bytes[i] = static_cast<uint8_t>(i * 13 + seed);
  return bytes;
}

// A file of `size` bytes without writing them (sparse), for "too large" cases.
void makeSparseFile(const std::filesystem::path& path, uint64_t size) {
  int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
  ::close(fd);
}

std::string readCmdline(const GuestMemory& memory, size_t length) {
  std::string text(length + 1, '?');
  memory.read(layout::kCmdlineAddr,
              std::span(reinterpret_cast<uint8_t*>(text.data()), text.size()));
  return text;
}

// Runs `load` and returns the clonevm::Error message; fails the test if nothing was thrown.
template <typename Fn>
std::string errorFrom(Fn&& load) {
  try {
    load();
  } catch (const Error& error) {
    return error.what();
  }
  ADD_FAILURE() << "expected a clonevm::Error";
  return {};
}

class LinuxLoaderTest : public ::testing::Test {
 protected:
  std::filesystem::path writeKernel(const std::vector<uint8_t>& bytes,
                                    const std::string& name = "kernel") {
    auto path = dir_ / name;
    writeFile(path, bytes);
    return path;
  }
  TempDir dir_;
};

TEST_F(LinuxLoaderTest, LoadsBzImageAndFillsBootParams) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({}));
  const LinuxBootInfo info = loadLinux(
      memory, {.kernelPath = kernel, .cmdline = "console=ttyS0 panic=1", .acpiRsdpAddress = 0xe0000});

  EXPECT_EQ(info.format, KernelFormat::kBzImage);
  EXPECT_EQ(info.entryPoint, layout::kHighMemStart + 0x200);
  EXPECT_EQ(info.bootParamsAddress, layout::kBootParamsAddr);
  EXPECT_EQ(info.kernelStart, layout::kHighMemStart);
  // Relocatable: runs from max(align_up(1 MiB, 2 MiB), pref_address 16 MiB), init_size 8 MiB.
  EXPECT_EQ(info.kernelEnd, 24 * kMiB);
  EXPECT_EQ(info.bootProtocolVersion, 0x020f);
  EXPECT_EQ(info.initrdAddress, 0u);

  // The protected-mode payload, byte for byte, at 1 MiB.
  std::vector<uint8_t> loaded(64 * 1024);
  memory.read(layout::kHighMemStart, loaded);
  for (size_t i = 0; i < loaded.size(); ++i) ASSERT_EQ(loaded[i], payloadByte(i)) << i;

  const auto params = memory.readObject<boot_params>(layout::kBootParamsAddr);
  EXPECT_EQ(params.hdr.boot_flag, 0xaa55);
  EXPECT_EQ(params.hdr.header, 0x53726448u);
  EXPECT_EQ(params.hdr.type_of_loader, 0xff);
  EXPECT_EQ(params.hdr.loadflags & (LOADED_HIGH | CAN_USE_HEAP), LOADED_HIGH | CAN_USE_HEAP);
  EXPECT_EQ(params.hdr.heap_end_ptr, 0xde00);
  EXPECT_EQ(params.hdr.cmd_line_ptr, layout::kCmdlineAddr);
  EXPECT_EQ(params.hdr.code32_start, layout::kHighMemStart);
  EXPECT_EQ(params.hdr.init_size, 8 * kMiB);  // the kernel's own header fields are kept
  EXPECT_EQ(params.acpi_rsdp_addr, 0xe0000u);
  EXPECT_EQ(params.hdr.ramdisk_image, 0u);
  EXPECT_EQ(params.hdr.ramdisk_size, 0u);
  EXPECT_EQ(params.sentinel, 0);
  EXPECT_EQ(readCmdline(memory, 21), std::string("console=ttyS0 panic=1") + '\0');

  ASSERT_EQ(params.e820_entries, 4);
  EXPECT_EQ(params.e820_table[0].addr, 0u);
  EXPECT_EQ(params.e820_table[0].size, layout::kEbdaStart);
  EXPECT_EQ(params.e820_table[0].type, kE820Ram);
  EXPECT_EQ(params.e820_table[2].addr, layout::kHighMemStart);
  EXPECT_EQ(params.e820_table[2].size, 63 * kMiB);
  EXPECT_EQ(params.e820_table[2].type, kE820Ram);
}

TEST_F(LinuxLoaderTest, NonRelocatableKernelRunsAtPrefAddress) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel =
      writeKernel(makeBzImage({.prefAddress = 32 * kMiB, .relocatable = 0, .initSize = 4 * kMiB}));
  EXPECT_EQ(loadLinux(memory, {.kernelPath = kernel}).kernelEnd, 36 * kMiB);
}

TEST_F(LinuxLoaderTest, InitrdGoesPageAlignedToTheTopOfLowRam) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({}));
  const auto initrdBytes = pattern(3 * 4096 + 123, 5);
  const auto initrd = dir_ / "initrd";
  writeFile(initrd, initrdBytes);

  const LinuxBootInfo info = loadLinux(memory, {.kernelPath = kernel, .initrdPath = initrd});
  EXPECT_EQ(info.initrdSize, initrdBytes.size());
  EXPECT_EQ(info.initrdAddress % 4096, 0u);
  EXPECT_EQ(info.initrdAddress, 64 * kMiB - 4 * 4096);  // highest page-aligned start that fits
  EXPECT_GE(info.initrdAddress, info.kernelEnd);

  std::vector<uint8_t> loaded(initrdBytes.size());
  memory.read(info.initrdAddress, loaded);
  EXPECT_EQ(loaded, initrdBytes);

  const auto params = memory.readObject<boot_params>(layout::kBootParamsAddr);
  EXPECT_EQ(params.hdr.ramdisk_image, info.initrdAddress);
  EXPECT_EQ(params.hdr.ramdisk_size, initrdBytes.size());
  EXPECT_EQ(params.ext_ramdisk_image, 0u);
}

TEST_F(LinuxLoaderTest, InitrdRespectsInitrdAddrMax) {
  auto memory = GuestMemory::create(128 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.initrdAddrMax = 48 * kMiB - 1}));
  const auto initrd = dir_ / "initrd";
  writeFile(initrd, pattern(10000, 1));
  const LinuxBootInfo info = loadLinux(memory, {.kernelPath = kernel, .initrdPath = initrd});
  EXPECT_LE(info.initrdAddress + info.initrdSize, 48 * kMiB);
  EXPECT_EQ(info.initrdAddress, 48 * kMiB - 3 * 4096);
}

TEST_F(LinuxLoaderTest, InitrdStaysBelowThePciHoleWithHighMemory) {
  auto memory = GuestMemory::create(4 * kGiB + 512 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.initrdAddrMax = 0xffffffff}));
  const auto initrd = dir_ / "initrd";
  writeFile(initrd, pattern(8192, 9));
  const LinuxBootInfo info = loadLinux(memory, {.kernelPath = kernel, .initrdPath = initrd});
  EXPECT_EQ(info.initrdAddress + info.initrdSize, layout::kLowRamEnd);
}

TEST_F(LinuxLoaderTest, CmdlineAtTheKernelLimitIsAccepted) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.cmdlineSize = 16}));
  const std::string cmdline(16, 'x');
  loadLinux(memory, {.kernelPath = kernel, .cmdline = cmdline});
  EXPECT_EQ(readCmdline(memory, 16), cmdline + '\0');
}

TEST_F(LinuxLoaderTest, LoadsElfVmlinuxWithVirtualEntry) {
  auto memory = GuestMemory::create(64 * kMiB);
  // Pre-fill so we can see the loader zero the bss.
  auto bssArea = memory.slice(16 * kMiB, 4 * kMiB);
  std::fill(bssArea.begin(), bssArea.end(), uint8_t{0xaa});

  const auto text = pattern(0x1800, 1);
  const auto data = pattern(0x200, 2);
  const auto kernel = writeKernel(makeElf(
      {
          {0xffffffff81000000, 16 * kMiB, text, 0x2000},
          {0xffffffff81200000, 18 * kMiB, data, 0x10000},  // 0x200 bytes + bss
      },
      0xffffffff81000100));
  const auto initrd = dir_ / "initrd";
  writeFile(initrd, pattern(5000, 3));

  const LinuxBootInfo info = loadLinux(
      memory, {.kernelPath = kernel, .initrdPath = initrd, .cmdline = "root=/dev/vda"});
  EXPECT_EQ(info.format, KernelFormat::kElfVmlinux);
  EXPECT_EQ(info.entryPoint, 16 * kMiB + 0x100);
  EXPECT_EQ(info.kernelStart, 16 * kMiB);
  EXPECT_EQ(info.kernelEnd, 18 * kMiB + 0x10000);
  EXPECT_GE(info.initrdAddress, info.kernelEnd);

  std::vector<uint8_t> loaded(text.size());
  memory.read(16 * kMiB, loaded);
  EXPECT_EQ(loaded, text);
  EXPECT_EQ(memory.readObject<uint8_t>(16 * kMiB + 0x1800), 0);  // memsz beyond filesz
  EXPECT_EQ(memory.readObject<uint8_t>(16 * kMiB + 0x1fff), 0);
  EXPECT_EQ(memory.readObject<uint8_t>(16 * kMiB + 0x2000), 0xaa);  // past the segment
  EXPECT_EQ(memory.readObject<uint8_t>(18 * kMiB + 0xffff), 0);

  const auto params = memory.readObject<boot_params>(layout::kBootParamsAddr);
  EXPECT_EQ(params.hdr.boot_flag, 0xaa55);
  EXPECT_EQ(params.hdr.header, 0x53726448u);
  EXPECT_EQ(params.hdr.type_of_loader, 0xff);
  EXPECT_EQ(params.hdr.kernel_alignment, 0x1000000u);
  EXPECT_EQ(params.hdr.cmd_line_ptr, layout::kCmdlineAddr);
  EXPECT_EQ(params.hdr.ramdisk_image, info.initrdAddress);
  EXPECT_EQ(params.hdr.ramdisk_size, 5000u);
  EXPECT_EQ(params.e820_entries, 4);
  EXPECT_EQ(readCmdline(memory, 13), std::string("root=/dev/vda") + '\0');
}

TEST_F(LinuxLoaderTest, ElfEntryThatIsAlreadyPhysicalIsKept) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel =
      writeKernel(makeElf({{0xffffffff81000000, 16 * kMiB, pattern(0x100, 1), 0x100}},
                          16 * kMiB + 0x40));
  EXPECT_EQ(loadLinux(memory, {.kernelPath = kernel}).entryPoint, 16 * kMiB + 0x40);
}

TEST(E820Test, LowMemoryOnly) {
  auto memory = GuestMemory::create(256 * kMiB);
  const auto map = buildE820Map(memory);
  ASSERT_EQ(map.size(), 4u);
  EXPECT_EQ(map[0].addr, 0u);
  EXPECT_EQ(map[0].size, layout::kEbdaStart);
  EXPECT_EQ(map[0].type, kE820Ram);
  EXPECT_EQ(map[1].addr, layout::kEbdaStart);
  EXPECT_EQ(map[1].addr + map[1].size, layout::kHighMemStart);
  EXPECT_EQ(map[1].type, kE820Reserved);
  EXPECT_EQ(map[2].addr, layout::kHighMemStart);
  EXPECT_EQ(map[2].addr + map[2].size, 256 * kMiB);
  EXPECT_EQ(map[2].type, kE820Ram);
  EXPECT_EQ(map[3].addr, layout::kEcamStart);
  EXPECT_EQ(map[3].size, layout::kEcamSize);
  EXPECT_EQ(map[3].type, kE820Reserved);
}

TEST(E820Test, HighMemoryAboveFourGiB) {
  auto memory = GuestMemory::create(4 * kGiB + 512 * kMiB);
  const auto map = buildE820Map(memory);
  ASSERT_EQ(map.size(), 5u);
  EXPECT_EQ(map[2].addr + map[2].size, layout::kLowRamEnd);
  EXPECT_EQ(map[3].addr, layout::kEcamStart);
  EXPECT_EQ(map[4].addr, layout::kHighRamStart);
  EXPECT_EQ(map[4].size, 1 * kGiB + 512 * kMiB);
  EXPECT_EQ(map[4].type, kE820Ram);
  for (size_t i = 1; i < map.size(); ++i) {
    EXPECT_LE(map[i - 1].addr + map[i - 1].size, map[i].addr) << "entries overlap at " << i;
  }
}

// ---- Bad input: one clear clonevm::Error each ----

TEST_F(LinuxLoaderTest, MissingKernelIsASystemErrorNamingThePath) {
  auto memory = GuestMemory::create(16 * kMiB);
  const auto missing = dir_ / "no-such-kernel";
  try {
    loadLinux(memory, {.kernelPath = missing});
    FAIL() << "expected SystemError";
  } catch (const SystemError& error) {
    EXPECT_EQ(error.code(), ENOENT);
    EXPECT_THAT(error.what(), HasSubstr(missing.string()));
    EXPECT_THAT(error.what(), HasSubstr("open kernel image"));
  }
}

TEST_F(LinuxLoaderTest, MissingInitrdIsASystemErrorNamingThePath) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({}));
  const auto missing = dir_ / "no-such-initrd";
  try {
    loadLinux(memory, {.kernelPath = kernel, .initrdPath = missing});
    FAIL() << "expected SystemError";
  } catch (const SystemError& error) {
    EXPECT_THAT(error.what(), HasSubstr("open initrd"));
    EXPECT_THAT(error.what(), HasSubstr(missing.string()));
  }
}

TEST_F(LinuxLoaderTest, RejectsAFileThatIsNeitherBzImageNorElf) {
  auto memory = GuestMemory::create(16 * kMiB);
  const auto kernel = writeKernel(pattern(8192, 0));
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); }),
              HasSubstr("neither a bzImage"));
  const auto tiny = writeKernel({'h', 'i'}, "tiny");
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = tiny}); }),
              HasSubstr("neither a bzImage"));
}

TEST_F(LinuxLoaderTest, RejectsAnEmptyKernel) {
  auto memory = GuestMemory::create(16 * kMiB);
  const auto kernel = writeKernel({});
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); }), HasSubstr("empty"));
}

TEST_F(LinuxLoaderTest, RejectsSetupSectorsBeyondTheFile) {
  auto memory = GuestMemory::create(64 * kMiB);
  // 0xf0 setup sectors = 123 KiB of setup code in a 66 KiB file.
  const auto kernel = writeKernel(makeBzImage({.setupSects = 0xf0}));
  const std::string message = errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); });
  EXPECT_THAT(message, HasSubstr("truncated"));
  EXPECT_THAT(message, HasSubstr("setup_sects"));
}

TEST_F(LinuxLoaderTest, RejectsSyssizeBeyondTheFile) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.syssize = 0x100000}));
  const std::string message = errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); });
  EXPECT_THAT(message, HasSubstr("truncated"));
  EXPECT_THAT(message, HasSubstr("syssize"));
}

TEST_F(LinuxLoaderTest, RejectsATruncatedHeader) {
  auto memory = GuestMemory::create(64 * kMiB);
  auto image = makeBzImage({});
  image.resize(0x210);  // magic present, the rest of the header cut off
  const auto kernel = writeKernel(image);
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); }),
              HasSubstr("truncated"));
}

TEST_F(LinuxLoaderTest, RejectsA32BitOnlyBzImage) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.xloadflags = 0}));
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); }),
              HasSubstr("32-bit only"));
}

TEST_F(LinuxLoaderTest, RejectsABootProtocolTooOldFor64BitEntry) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.version = 0x0206}));
  const std::string message = errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); });
  EXPECT_THAT(message, HasSubstr("2.06"));
  EXPECT_THAT(message, HasSubstr("2.12"));
}

TEST_F(LinuxLoaderTest, RejectsA32BitElf) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel =
      writeKernel(makeElf({{0xc1000000, 16 * kMiB, pattern(16, 1), 16}}, 0xc1000000, ELFCLASS32));
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); }),
              HasSubstr("32-bit"));
}

TEST_F(LinuxLoaderTest, RejectsAnElfWithSegmentsPastTheFile) {
  auto memory = GuestMemory::create(64 * kMiB);
  auto image = makeElf({{0xffffffff81000000, 16 * kMiB, pattern(0x1000, 1), 0x1000}},
                       0xffffffff81000000);
  image.resize(image.size() - 0x800);
  const auto kernel = writeKernel(image);
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); }),
              HasSubstr("truncated"));
}

TEST_F(LinuxLoaderTest, RejectsAnElfThatDoesNotFitInRam) {
  auto memory = GuestMemory::create(16 * kMiB);
  const auto kernel = writeKernel(
      makeElf({{0xffffffff81000000, 16 * kMiB, pattern(0x100, 1), 0x100}}, 0xffffffff81000000));
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); }),
              HasSubstr("too small"));
}

TEST_F(LinuxLoaderTest, RejectsMemoryTooSmallForInitSize) {
  auto memory = GuestMemory::create(32 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.initSize = 32 * kMiB}));
  const std::string message = errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); });
  EXPECT_THAT(message, HasSubstr("too small"));
  EXPECT_THAT(message, HasSubstr("init_size"));
}

TEST_F(LinuxLoaderTest, RejectsAPrefAddressThatWrapsAround) {
  auto memory = GuestMemory::create(32 * kMiB);
  const auto kernel =
      writeKernel(makeBzImage({.prefAddress = 0xfffffffffff00000, .relocatable = 0}));
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel}); }),
              HasSubstr("too small"));
}

TEST_F(LinuxLoaderTest, RejectsAnInitrdLargerThanTheRamLeft) {
  auto memory = GuestMemory::create(32 * kMiB);
  const auto kernel = writeKernel(makeBzImage({}));  // runs 16..24 MiB, leaving 8 MiB
  const auto initrd = dir_ / "initrd";
  makeSparseFile(initrd, 8 * kMiB + 1);
  const std::string message =
      errorFrom([&] { loadLinux(memory, {.kernelPath = kernel, .initrdPath = initrd}); });
  EXPECT_THAT(message, HasSubstr("initrd"));
  EXPECT_THAT(message, HasSubstr(initrd.string()));

  makeSparseFile(initrd, 8 * kMiB);  // exactly the room left is fine
  EXPECT_EQ(loadLinux(memory, {.kernelPath = kernel, .initrdPath = initrd}).initrdAddress,
            24 * kMiB);
}

TEST_F(LinuxLoaderTest, RejectsACmdlineLongerThanTheKernelAccepts) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.cmdlineSize = 16}));
  const std::string message =
      errorFrom([&] { loadLinux(memory, {.kernelPath = kernel, .cmdline = std::string(17, 'x')}); });
  EXPECT_THAT(message, HasSubstr("command line is 17 bytes"));
  EXPECT_THAT(message, HasSubstr("at most 16"));
}

TEST_F(LinuxLoaderTest, RejectsACmdlineLongerThanOurBuffer) {
  auto memory = GuestMemory::create(64 * kMiB);
  const auto kernel = writeKernel(makeBzImage({.cmdlineSize = 0xffffffff}));
  const std::string tooLong(layout::kCmdlineMax, 'x');
  EXPECT_THAT(errorFrom([&] { loadLinux(memory, {.kernelPath = kernel, .cmdline = tooLong}); }),
              HasSubstr("command line"));
}

}  // namespace
}  // namespace clonevm::vmm
