// The template format on the host (no KVM): state round trip, manifest round trip, the sparse
// memory image, and refusal of corrupted, truncated and wrong-version templates.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/unique_fd.h"
#include "vmm-core/snapshot/machine_state.h"
#include "vmm-core/snapshot/state_codec.h"
#include "vmm-core/snapshot/template_files.h"

namespace clonevm::vmm::snapshot {
namespace {

MachineState sampleState(uint32_t vcpus) {
  MachineState s;
  s.vm.picMaster.chip_id = KVM_IRQCHIP_PIC_MASTER;
  s.vm.picMaster.chip.pic.imr = 0xfb;
  s.vm.picSlave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
  s.vm.ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
  s.vm.ioapic.chip.ioapic.redirtbl[4].bits = 0x1234;
  s.vm.pit.channels[0].count = 0xabcd;
  s.vm.clock.clock = 123456789;
  for (uint32_t id = 0; id < vcpus; ++id) {
    VcpuState v;
    v.id = id;
    kvm_cpuid_entry2 leaf{};
    leaf.function = 1;
    leaf.eax = 0x800f12 + id;
    v.cpuid = {leaf};
    v.regs.rip = 0xffffffff81000000ull + id;
    v.regs.rsp = 0x7000;
    v.sregs.cr3 = 0x1000 * (id + 1);
    v.fpu.fcw = 0x37f;
    v.xsave.assign(1024 + 16, 0);
    v.xsave[5] = 77;
    v.xcrs.nr_xcrs = 1;
    v.msrs = {{0x10, 0, 42}, {0xc0000082, 0, 0xffffffff81e00000ull}};
    v.lapic.regs[0x20] = static_cast<char>(id);
    v.events.nmi.pending = 1;
    v.mpState.mp_state = KVM_MP_STATE_HALTED;
    v.debugRegs.dr7 = 0x400;
    s.vcpus.push_back(v);
  }
  s.devices.serial = Serial::State{1, 3, 0xb, 0, 0, 0x55, 1, 0, 0xc7, true, false, true, {'a', 'b'}};
  s.devices.cmos.index = 0x0b;
  s.devices.cmos.nvram[0x10] = 0x42;
  s.devices.cmos.regB = 0x02;
  s.devices.cmos.offsetNanos = -5'000'000'000;
  s.devices.acpiPm = AcpiPm::State{0x100, 0x120, 1, 0x123456};
  s.devices.i8042.ram[0] = 0x47;
  s.devices.i8042.outputPort = 3;
  s.devices.i8042.pendingCommand = -1;
  s.devices.i8042.outputBuffer = 0x1fa;
  s.devices.i8042.queue = {0xfa, 0x1aa};
  VirtioDeviceState vsock;
  vsock.deviceType = 19;
  vsock.barAddress = 0x8000000000;
  vsock.transport.registers.negotiatedFeatures = 0x100000000;
  vsock.transport.registers.status = 0xf;
  vsock.transport.queues.resize(3);
  vsock.transport.queues[2].desc = 0x123000;
  vsock.transport.msixTable.resize(4);
  vsock.transport.msixTable[3].data = 0x41;
  vsock.vsock = VhostVsockState{.guestCid = 1234, .rxBase = 7, .txBase = 9,
                                .eventNextAvail = 8, .eventNextUsed = 0};
  s.virtio.push_back(vsock);
  return s;
}

// Template digests are SHA-256 (libmd): FIPS 180-2's test vectors, the empty input included.
TEST(TemplateDigestTest, Sha256MatchesTheStandardVectors) {
  EXPECT_EQ(sha256Hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256Hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  std::string twoBlocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(sha256Hex(twoBlocks.data(), twoBlocks.size()),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(StateFormatTest, RoundTripKeepsEveryField) {
  auto state = sampleState(2);
  auto bytes = encodeMachineState(state);
  auto back = decodeMachineState(bytes, "test state");
  ASSERT_EQ(back.vcpus.size(), 2u);
  EXPECT_EQ(back.vm.picMaster.chip.pic.imr, 0xfb);
  EXPECT_EQ(back.vm.ioapic.chip.ioapic.redirtbl[4].bits, 0x1234u);
  EXPECT_EQ(back.vm.pit.channels[0].count, 0xabcdu);
  EXPECT_EQ(back.vm.clock.clock, 123456789u);
  EXPECT_EQ(back.vcpus[1].regs.rip, 0xffffffff81000001ull);
  EXPECT_EQ(back.vcpus[1].sregs.cr3, 0x2000u);
  EXPECT_EQ(back.vcpus[1].cpuid.at(0).eax, 0x800f13u);
  EXPECT_EQ(back.vcpus[0].xsave.size(), 1040u);
  EXPECT_EQ(back.vcpus[0].xsave[5], 77u);
  ASSERT_EQ(back.vcpus[0].msrs.size(), 2u);
  EXPECT_EQ(back.vcpus[0].msrs[1].data, 0xffffffff81e00000ull);
  EXPECT_EQ(back.vcpus[1].lapic.regs[0x20], 1);
  EXPECT_EQ(back.vcpus[0].mpState.mp_state, static_cast<uint32_t>(KVM_MP_STATE_HALTED));
  EXPECT_EQ(back.vcpus[0].debugRegs.dr7, 0x400u);
  EXPECT_EQ(back.devices.serial.scr, 0x55);
  EXPECT_TRUE(back.devices.serial.irqLevel);
  EXPECT_EQ(back.devices.serial.rxFifo, (std::vector<uint8_t>{'a', 'b'}));
  EXPECT_EQ(back.devices.cmos.nvram[0x10], 0x42);
  EXPECT_EQ(back.devices.cmos.offsetNanos, -5'000'000'000);
  EXPECT_EQ(back.devices.acpiPm.timer, 0x123456u);
  EXPECT_EQ(back.devices.i8042.outputBuffer, 0x1fa);
  EXPECT_EQ(back.devices.i8042.pendingCommand, -1);
  EXPECT_EQ(back.devices.i8042.queue, (std::vector<uint16_t>{0xfa, 0x1aa}));
  ASSERT_EQ(back.virtio.size(), 1u);
  EXPECT_EQ(back.virtio[0].deviceType, 19u);
  EXPECT_EQ(back.virtio[0].barAddress, 0x8000000000u);
  EXPECT_EQ(back.virtio[0].transport.registers.negotiatedFeatures, 0x100000000u);
  EXPECT_EQ(back.virtio[0].transport.registers.status, 0xf);
  ASSERT_EQ(back.virtio[0].transport.queues.size(), 3u);
  EXPECT_EQ(back.virtio[0].transport.queues[2].desc, 0x123000u);
  ASSERT_EQ(back.virtio[0].transport.msixTable.size(), 4u);
  EXPECT_EQ(back.virtio[0].transport.msixTable[3].data, 0x41u);
  ASSERT_TRUE(back.virtio[0].vsock);
  EXPECT_EQ(back.virtio[0].vsock->guestCid, 1234u);
  EXPECT_EQ(back.virtio[0].vsock->txBase, 9);
  EXPECT_EQ(back.virtio[0].vsock->eventNextAvail, 8);
  // Encoding is deterministic: the same state gives the same bytes.
  EXPECT_EQ(encodeMachineState(back), bytes);
}

TEST(StateFormatTest, VhostUserDeviceStateRoundTripsAndIsChecked) {
  auto state = sampleState(1);
  VirtioDeviceState disk;
  disk.deviceType = 2;
  disk.barAddress = 0x8000004000;
  VhostUserDeviceState user;
  user.deviceType = 2;
  user.backendFeatures = 0x1'4000'0244ull;
  user.ackedFeatures = 0x1'0000'0244ull;
  user.protocolFeatures = 0x8e3;
  user.numQueues = 2;
  user.queues = {{.index = 0, .size = 128, .availIndex = 517}, {.index = 1, .size = 64, .availIndex = 3}};
  user.config = std::vector<uint8_t>(60, 0);
  user.config[0] = 0x20;  // capacity
  disk.vhostUser = user;
  state.virtio.insert(state.virtio.begin(), disk);
  auto bytes = encodeMachineState(state);
  auto back = decodeMachineState(bytes, "s");
  ASSERT_EQ(back.virtio.size(), 2u);
  ASSERT_TRUE(back.virtio[0].vhostUser);
  EXPECT_FALSE(back.virtio[0].vsock);
  EXPECT_FALSE(back.virtio[1].vhostUser);
  const auto& got = *back.virtio[0].vhostUser;
  EXPECT_EQ(got.backendFeatures, user.backendFeatures);
  EXPECT_EQ(got.ackedFeatures, user.ackedFeatures);
  EXPECT_EQ(got.protocolFeatures, 0x8e3u);
  EXPECT_EQ(got.numQueues, 2);
  ASSERT_EQ(got.queues.size(), 2u);
  EXPECT_EQ(got.queues[0].availIndex, 517);
  EXPECT_EQ(got.queues[1].size, 64);
  EXPECT_EQ(got.config, user.config);
  EXPECT_EQ(encodeMachineState(back), bytes);

  // Queue records out of order, or beyond the device's queue count, are refused.
  auto swapped = state;
  std::swap(swapped.virtio[0].vhostUser->queues[0], swapped.virtio[0].vhostUser->queues[1]);
  EXPECT_THROW(decodeMachineState(encodeMachineState(swapped), "s"), Error);
  auto beyond = state;
  beyond.virtio[0].vhostUser->queues[1].index = 2;
  EXPECT_THROW(decodeMachineState(encodeMachineState(beyond), "s"), Error);
}

TEST(StateFormatTest, RefusesBadMagicVersionAndTruncation) {
  auto bytes = encodeMachineState(sampleState(1));
  auto badMagic = bytes;
  badMagic[0] = 'X';
  EXPECT_THROW(decodeMachineState(badMagic, "s"), Error);
  auto badVersion = bytes;
  badVersion[8] = 99;
  try {
    decodeMachineState(badVersion, "s");
    FAIL() << "a wrong version was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("version 99"), std::string::npos) << e.what();
  }
  for (size_t cut : {bytes.size() - 1, bytes.size() / 2, size_t{20}}) {
    std::vector<uint8_t> truncated(bytes.begin(), bytes.begin() + static_cast<ptrdiff_t>(cut));
    EXPECT_THROW(decodeMachineState(truncated, "s"), Error) << "cut at " << cut;
  }
}

TEST(StateFormatTest, RefusesAFieldOfTheWrongSize) {
  StateWriter w;
  w.bytes(1, std::vector<uint8_t>(3));
  auto file = w.finish();
  auto reader = StateReader::file(file, "t");
  EXPECT_THROW(reader.pod<uint64_t>(1), Error);
  EXPECT_THROW(reader.bytes(2), Error);
}

class TemplateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("clone-template-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::permissions(dir_, std::filesystem::perms::owner_all, ignored);
    for (auto& entry : std::filesystem::directory_iterator(dir_, ignored)) {
      std::filesystem::permissions(entry.path(), std::filesystem::perms::owner_all, ignored);
    }
    std::filesystem::remove_all(dir_, ignored);
  }

  // A 4 MiB "guest" with data in a few pages; writes a whole template.
  void writeTemplate() {
    constexpr uint64_t kSize = 4 << 20;
    UniqueFd memfd(::memfd_create("test-ram", MFD_CLOEXEC));
    ASSERT_EQ(::ftruncate(memfd.get(), kSize), 0);
    std::vector<uint8_t> page(4096, 0);
    page[7] = 0x99;
    for (uint64_t offset : {0ull, 4096ull, 1ull << 20, (4ull << 20) - 4096}) {
      page[8] = static_cast<uint8_t>(offset >> 12);
      ASSERT_EQ(::pwrite(memfd.get(), page.data(), page.size(), static_cast<off_t>(offset)), 4096);
    }
    std::vector<uint8_t> zero(4096, 0);  // touched but zero: must become a hole
    ASSERT_EQ(::pwrite(memfd.get(), zero.data(), zero.size(), 2 << 20), 4096);

    // Written as a jailed core does: into an open directory.
    UniqueFd dirFd(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    ASSERT_TRUE(dirFd);
    auto stateBytes = encodeMachineState(sampleState(1));
    writeReadOnlyFileAt(dirFd.get(), dir_, kStateFile, stateBytes.data(), stateBytes.size());
    std::string memoryPath = dir_ + "/" + kMemoryFile;
    UniqueFd memoryOut = createTemplateFile(dirFd.get(), dir_, kMemoryFile, 0644);
    extents_ = writeSparseMemoryImage(memfd.get(), kSize, memoryOut.get(), memoryPath);
    Manifest m;
    m.createdUtc = currentUtcTime();
    m.memoryBytes = kSize;
    m.regions = {{0, kSize, 0}};
    m.vcpus = 1;
    m.kernel = "/boot/vmlinuz";
    m.cmdline = "console=ttyS0";
    m.devices = {"serial"};
    m.cpuid = {{1, 0, 0, 0x800f12, 0, 0, 0}};
    m.stateSize = stateBytes.size();
    m.stateSha256 = sha256Hex(stateBytes.data(), stateBytes.size());
    UniqueFd image(::open(memoryPath.c_str(), O_RDONLY));
    describeMemoryImage(image.get(), kSize, extents_, m, memoryPath);
    manifest_ = m;
    std::string json = toJson(m);
    writeReadOnlyFile(dir_, kManifestFile, json.data(), json.size());
  }

  std::string expectRefused() {
    try {
      verifyTemplate(dir_);
    } catch (const Error& e) {
      return e.what();
    }
    ADD_FAILURE() << "a damaged template was accepted";
    return "";
  }

  void rewrite(const std::string& name, const std::function<void(std::string&)>& change) {
    std::string path = dir_ + "/" + name;
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    change(bytes);
    ::chmod(path.c_str(), 0644);
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  }

  std::string dir_;
  std::vector<Extent> extents_;
  Manifest manifest_;
};

// Adds disk0.raw (1 MiB: data at the start, in the middle and at the end, holes between)
// to a written template and lists it in the manifest as `clone snapshot` does.
void addDisk(const std::string& dir, Manifest& manifest) {
  std::string path = dir + "/disk0.raw";
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  ASSERT_TRUE(fd);
  ASSERT_EQ(::ftruncate(fd.get(), 1 << 20), 0);
  std::string text = "CLONE-DISK";
  for (off_t offset : {off_t{0}, off_t{512 << 10}, off_t{(1 << 20) - 4096}}) {
    ASSERT_EQ(::pwrite(fd.get(), text.data(), text.size(), offset), static_cast<ssize_t>(text.size()));
  }
  ::fchmod(fd.get(), 0444);
  TemplateDisk disk{.file = "disk0.raw", .source = "/images/base.qcow2", .sourceFormat = "qcow2",
                    .bytes = 1 << 20, .readOnly = false, .queues = 2, .sha256 = {}};
  disk.sha256 = templateDiskDigest(fd.get(), disk.bytes, path);
  manifest.disks = {disk};
  rewriteManifest(dir, manifest);
}

TEST_F(TemplateTest, DisksAreListedAndVerified) {
  writeTemplate();
  addDisk(dir_, manifest_);
  auto verified = verifyTemplate(dir_);
  ASSERT_EQ(verified.manifest.disks.size(), 1u);
  const auto& disk = verified.manifest.disks[0];
  EXPECT_EQ(disk.file, "disk0.raw");
  EXPECT_EQ(disk.source, "/images/base.qcow2");
  EXPECT_EQ(disk.sourceFormat, "qcow2");
  EXPECT_EQ(disk.bytes, 1u << 20);
  EXPECT_EQ(disk.queues, 2);
  EXPECT_EQ(disk.sha256, manifest_.disks[0].sha256);
  struct stat st {};
  ASSERT_EQ(::stat((dir_ + "/" + kManifestFile).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0444u) << "the rewritten manifest is read-only too";
}

TEST_F(TemplateTest, RefusesADamagedOrUncopiedDisk) {
  struct Case {
    const char* name;
    std::function<void(const std::string& path)> damage;
    const char* reason;
  };
  auto writeAt = [](const std::string& path, off_t offset) {
    ::chmod(path.c_str(), 0644);
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_EQ(::pwrite(fd.get(), "x", 1, offset), 1);
  };
  std::vector<Case> cases = {
      {"truncated", [](const std::string& path) { ::chmod(path.c_str(), 0644); ASSERT_EQ(::truncate(path.c_str(), 1 << 19), 0); },
       "truncated"},
      {"head", [&](const std::string& path) { writeAt(path, 3); }, "differs from the manifest's digest"},
      {"hole", [&](const std::string& path) { writeAt(path, 300 << 10); }, "differs from the manifest's digest"},
      {"sampled", [&](const std::string& path) { writeAt(path, (512 << 10) + 1); }, "differs from the manifest's digest"},
      {"missing", [](const std::string& path) { ::unlink(path.c_str()); }, "disk0.raw"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    TearDown();
    SetUp();
    writeTemplate();
    addDisk(dir_, manifest_);
    c.damage(dir_ + "/disk0.raw");
    EXPECT_NE(expectRefused().find(c.reason), std::string::npos);
  }
  // A manifest whose disk was never copied (the snapshot did not finish).
  TearDown();
  SetUp();
  writeTemplate();
  addDisk(dir_, manifest_);
  manifest_.disks[0].sha256.clear();
  rewriteManifest(dir_, manifest_);
  EXPECT_NE(expectRefused().find("never copied"), std::string::npos);
}

TEST_F(TemplateTest, RefusesADiskFileNameOutsideTheTemplate) {
  writeTemplate();
  addDisk(dir_, manifest_);
  for (const char* name : {"../disk0.raw", "/etc/passwd", ".hidden", ""}) {
    auto m = manifest_;
    m.disks[0].file = name;
    EXPECT_THROW(manifestFromJson(toJson(m), "m"), Error) << name;
  }
}

TEST_F(TemplateTest, ImageIsSparseReadOnlyAndVerifies) {
  writeTemplate();
  struct stat st {};
  ASSERT_EQ(::stat((dir_ + "/" + kMemoryFile).c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 4 << 20);
  EXPECT_EQ(st.st_mode & 0777, 0444u);
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, 64u * 1024) << "zero pages were written";
  uint64_t data = 0;
  for (const auto& e : extents_) data += e.length;
  EXPECT_GE(data, 4u * 4096);
  EXPECT_LT(data, 1u << 20);
  auto verified = verifyTemplate(dir_);
  EXPECT_EQ(verified.manifest.memoryBytes, 4u << 20);
  EXPECT_EQ(verified.manifest.cmdline, "console=ttyS0");
  EXPECT_EQ(verified.memoryExtents, extents_);
  EXPECT_FALSE(verified.manifest.memorySamples.empty());
  auto state = decodeMachineState(verified.state, "state");
  EXPECT_EQ(state.vcpus.size(), 1u);
}

TEST_F(TemplateTest, ManifestRoundTrip) {
  writeTemplate();
  auto back = manifestFromJson(toJson(manifest_), "m");
  EXPECT_EQ(back.stateSha256, manifest_.stateSha256);
  EXPECT_EQ(back.memoryExtentsSha256, manifest_.memoryExtentsSha256);
  EXPECT_EQ(back.memorySamples.size(), manifest_.memorySamples.size());
  EXPECT_EQ(back.cpuid.at(0).eax, 0x800f12u);
  EXPECT_EQ(back.regions.at(0).size, 4u << 20);
}

TEST_F(TemplateTest, RefusesAFlippedByteInTheState) {
  writeTemplate();
  rewrite(kStateFile, [](std::string& b) { b[b.size() / 2] ^= 0x01; });
  EXPECT_NE(expectRefused().find("SHA-256"), std::string::npos);
}

TEST_F(TemplateTest, RefusesATruncatedMemoryImage) {
  writeTemplate();
  std::string path = dir_ + "/" + kMemoryFile;
  ::chmod(path.c_str(), 0644);
  ASSERT_EQ(::truncate(path.c_str(), (4 << 20) - 8192), 0);
  EXPECT_NE(expectRefused().find("truncated"), std::string::npos);
}

// A fork server checks a template once; each fork rechecks that the memory file is the same.
TEST_F(TemplateTest, ARecheckRefusesAMemoryFileChangedSinceTheCheck) {
  writeTemplate();
  auto verified = verifyTemplate(dir_);
  EXPECT_NO_THROW(recheckTemplate(verified));
  std::string path = dir_ + "/" + kMemoryFile;
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);  // even a chmod: the inode changed
  try {
    recheckTemplate(verified);
    ADD_FAILURE() << "not refused";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("changed since the fork server checked it"), std::string::npos)
        << error.what();
  }
  auto again = verifyTemplate(dir_);
  ASSERT_EQ(::truncate(path.c_str(), (4 << 20) - 8192), 0);
  EXPECT_THROW(recheckTemplate(again), Error);
  ASSERT_EQ(::unlink(path.c_str()), 0);
  EXPECT_THROW(recheckTemplate(again), Error);
}

TEST_F(TemplateTest, RefusesAChangedSamplePage) {
  writeTemplate();
  std::string path = dir_ + "/" + kMemoryFile;
  ::chmod(path.c_str(), 0644);
  UniqueFd fd(::open(path.c_str(), O_WRONLY));
  uint8_t byte = 0x5a;
  ASSERT_EQ(::pwrite(fd.get(), &byte, 1, 100), 1);  // page 0 is always sampled
  EXPECT_NE(expectRefused().find("differs"), std::string::npos);
}

TEST_F(TemplateTest, RefusesAnotherVersion) {
  writeTemplate();
  rewrite(kManifestFile, [](std::string& b) {
    auto at = b.find("\"version\": 1");
    ASSERT_NE(at, std::string::npos);
    b.replace(at, 12, "\"version\": 7");
  });
  EXPECT_NE(expectRefused().find("version 7"), std::string::npos);
}

TEST_F(TemplateTest, RefusesAMissingFile) {
  writeTemplate();
  ::unlink((dir_ + "/" + kStateFile).c_str());
  EXPECT_NE(expectRefused().find("state"), std::string::npos);
}

}  // namespace
}  // namespace clonevm::vmm::snapshot
