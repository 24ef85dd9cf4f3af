#include "vmm-core/devices/pci_root.h"

#include <vector>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "common/error.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/devices/pci_config.h"
#include "vmm-core/devices/pci_host_bridge.h"

namespace clonevm::vmm {
namespace {

struct Move {
  int index;
  std::optional<uint64_t> from;
  std::optional<uint64_t> to;
  friend bool operator==(const Move&, const Move&) = default;
};

class FakeDevice : public PciDevice {
 public:
  explicit FakeDevice(std::array<PciBar, kPciBarCount> bars = {})
      : config(PciIds{.vendor = 0x1af4, .device = 0x1042, .classCode = 0x018000}), bars_(bars) {}

  void readConfig(uint16_t offset, std::span<uint8_t> data) override {
    config.read(offset, data);
  }
  void writeConfig(uint16_t offset, std::span<const uint8_t> data) override {
    config.write(offset, data);
  }
  std::array<PciBar, kPciBarCount> bars() const override { return bars_; }
  void barMoved(int index, std::optional<uint64_t> from, std::optional<uint64_t> to) override {
    moves.push_back(Move{index, from, to});
  }

  PciConfigSpace config;
  std::vector<Move> moves;

 private:
  std::array<PciBar, kPciBarCount> bars_;
};

class PciRootTest : public ::testing::Test {
 protected:
  PciRootTest()
      : log_("test", std::make_shared<spdlog::sinks::null_sink_mt>()),
        root_(std::make_shared<PciRoot>(log_)),
        ecam_(root_),
        io_(root_, nullptr, log_) {}

  static uint64_t ecamOffset(uint8_t bus, uint8_t device, uint8_t function, uint16_t reg) {
    return uint64_t{bus} << 20 | uint64_t{device} << 15 | uint64_t{function} << 12 | reg;
  }
  uint32_t ecamRead(uint8_t device, uint16_t reg, size_t size = 4, uint8_t bus = 0,
                    uint8_t function = 0) {
    uint8_t bytes[8] = {};
    ecam_.read(ecamOffset(bus, device, function, reg), {bytes, size});
    uint32_t value = 0;
    for (size_t i = 0; i < std::min<size_t>(size, 4); ++i) value |= uint32_t{bytes[i]} << (8 * i);
    return value;
  }
  void ecamWrite(uint8_t device, uint16_t reg, uint32_t value, size_t size = 4) {
    uint8_t bytes[8] = {};
    for (size_t i = 0; i < std::min<size_t>(size, 4); ++i) bytes[i] = static_cast<uint8_t>(value >> (8 * i));
    ecam_.write(ecamOffset(0, device, 0, reg), {bytes, size});
  }
  void ioWrite(uint64_t offset, uint32_t value, size_t size) {
    uint8_t bytes[4] = {};
    for (size_t i = 0; i < size; ++i) bytes[i] = static_cast<uint8_t>(value >> (8 * i));
    io_.write(offset, {bytes, size});
  }
  uint32_t ioRead(uint64_t offset, size_t size) {
    uint8_t bytes[4] = {};
    io_.read(offset, {bytes, size});
    uint32_t value = 0;
    for (size_t i = 0; i < size; ++i) value |= uint32_t{bytes[i]} << (8 * i);
    return value;
  }
  uint32_t type1Read(uint8_t device, uint8_t reg, size_t size = 4, uint8_t function = 0) {
    ioWrite(0, 0x80000000u | device << 11 | function << 8 | (reg & 0xfc), 4);
    return ioRead(4 + (reg & 3), size);
  }
  void type1Write(uint8_t device, uint8_t reg, uint32_t value, size_t size = 4) {
    ioWrite(0, 0x80000000u | device << 11 | (reg & 0xfc), 4);
    ioWrite(4 + (reg & 3), value, size);
  }

  spdlog::logger log_;
  std::shared_ptr<PciRoot> root_;
  PciEcam ecam_;
  PciConfigIo io_;
};

TEST_F(PciRootTest, HostBridgeThroughEcam) {
  EXPECT_EQ(ecamRead(0, 0x00), 0x0d578086u);
  EXPECT_EQ(ecamRead(0, 0x08), 0x06000000u);  // class 06:00:00, revision 0
  EXPECT_EQ(ecamRead(0, 0x0e, 1), 0x00u);      // header type 0, single function
  EXPECT_EQ(ecamRead(0, 0x02, 2), PciHostBridge::kDeviceId);
  EXPECT_EQ(ecamRead(0, 0x0a, 2), 0x0600u);
  EXPECT_EQ(ecamRead(0, 0x100), 0u);  // extended config space exists (and is empty)
}

TEST_F(PciRootTest, HostBridgeThroughType1) {
  // Linux's pci_check_type1(): a byte to 0xCFB, then the enable bit must read back.
  ioWrite(3, 0x01, 1);
  ioWrite(0, 0x80000000u, 4);
  EXPECT_EQ(ioRead(0, 4), 0x80000000u);
  EXPECT_EQ(ioRead(4, 4), 0x0d578086u);
  EXPECT_EQ(ioRead(6, 2), 0x0d57u);  // any width at any offset of CONFIG_DATA
  EXPECT_EQ(ioRead(7, 1), 0x0du);
  EXPECT_EQ(type1Read(0, 0x0a, 2), 0x0600u);  // pci_sanity_check() looks for this class
  ioWrite(0, 0x7fffffffu, 4);  // reserved bits read back as 0
  EXPECT_EQ(ioRead(0, 4), 0x0ffffffcu);
  EXPECT_EQ(ioRead(4, 4), 0xffffffffu);  // enable bit clear: no config cycle
}

TEST_F(PciRootTest, Type1ExtendedRegisterBits) {
  auto device = std::make_shared<FakeDevice>();
  device->config.set32(0x104, 0xcafef00d);
  root_->addDevice(2, device);
  ioWrite(0, 0x80000000u | 0x1u << 24 | 2u << 11 | 0x04, 4);  // register 0x104
  EXPECT_EQ(ioRead(4, 4), 0xcafef00du);
  EXPECT_EQ(ioRead(6, 2), 0xcafeu);
}

TEST_F(PciRootTest, AbsentFunctionsReadAllOnes) {
  EXPECT_EQ(ecamRead(5, 0x00), 0xffffffffu);
  EXPECT_EQ(ecamRead(0, 0x00, 4, /*bus=*/1), 0xffffffffu);
  EXPECT_EQ(ecamRead(0, 0x00, 4, 0, /*function=*/1), 0xffffffffu);
  EXPECT_EQ(ecamRead(31, 0x00, 2), 0xffffu);
  EXPECT_EQ(type1Read(7, 0x00), 0xffffffffu);
  ecamWrite(5, 0x04, 0x7);  // dropped, no crash
  uint8_t beyond[4] = {};
  ecam_.read(layout::kEcamSize + 4, beyond);
  EXPECT_EQ(beyond[0], 0xff);
}

TEST_F(PciRootTest, OddSizedAndUnalignedAccesses) {
  EXPECT_EQ(ecamRead(0, 0x02, 4), 0xffffffffu);  // dword across a dword boundary
  EXPECT_EQ(ecamRead(0, 0x03, 2), 0xffffu);
  EXPECT_EQ(ecamRead(0, 0x00, 3), 0xffffffu);
  uint8_t eight[8] = {};
  ecam_.read(ecamOffset(0, 0, 0, 0), eight);
  EXPECT_EQ(eight[0], 0xff);
  EXPECT_EQ(ecamRead(0, 0x01, 2), 0x5780u);  // unaligned but inside a dword: fine
  uint16_t command = static_cast<uint16_t>(ecamRead(0, 0x04, 2));
  ecamWrite(0, 0x02, 0xffffffff, 4);  // dropped
  EXPECT_EQ(ecamRead(0, 0x04, 2), command);
  ecamWrite(0, 0x00, 0x12345678);  // read-only ids
  EXPECT_EQ(ecamRead(0, 0x00), 0x0d578086u);
  EXPECT_EQ(ioRead(0, 2), 0xffffu);  // CONFIG_ADDRESS is dword only
  EXPECT_EQ(ioRead(2, 4), 0xffffffffu);  // straddles address and data
}

TEST_F(PciRootTest, AddDeviceChecksSlotsAndBars) {
  auto device = std::make_shared<FakeDevice>();
  EXPECT_EQ(root_->addDevice(device), (Bdf{0, 1, 0}));
  EXPECT_EQ(ecamRead(1, 0x00), 0x10421af4u);
  EXPECT_EQ(type1Read(1, 0x00), 0x10421af4u);
  EXPECT_EQ(root_->addDevice(3, std::make_shared<FakeDevice>()).toString(), "00:03.0");
  EXPECT_THROW(root_->addDevice(3, std::make_shared<FakeDevice>()), Error);
  EXPECT_THROW(root_->addDevice(32, std::make_shared<FakeDevice>()), Error);
  std::array<PciBar, kPciBarCount> bad{};
  bad[0] = PciBar{PciBarType::kMmio32, 0x3000};  // not a power of two
  EXPECT_THROW(root_->addDevice(4, std::make_shared<FakeDevice>(bad)), Error);
  bad[0] = PciBar{PciBarType::kMmio64, 0x4000};
  bad[1] = PciBar{PciBarType::kIo, 0x10};  // the 64-bit BAR's upper half is taken
  EXPECT_THROW(root_->addDevice(4, std::make_shared<FakeDevice>(bad)), Error);
  bad = {};
  bad[5] = PciBar{PciBarType::kMmio64, 0x4000};  // no BAR 6 for the upper half
  EXPECT_THROW(root_->addDevice(4, std::make_shared<FakeDevice>(bad)), Error);
  bad = {};
  bad[0] = PciBar{PciBarType::kIo, 0x1000};  // I/O BARs are at most 256 bytes
  EXPECT_THROW(root_->addDevice(4, std::make_shared<FakeDevice>(bad)), Error);
  bad = {};
  bad[0] = PciBar{PciBarType::kMmio32, 0x4000, false, 0x1000};  // misaligned
  EXPECT_THROW(root_->addDevice(4, std::make_shared<FakeDevice>(bad)), Error);
  EXPECT_EQ(ecamRead(4, 0x00), 0xffffffffu);  // failed adds leave the slot empty
}

TEST_F(PciRootTest, SizingA32BitBar) {
  std::array<PciBar, kPciBarCount> bars{};
  bars[0] = PciBar{PciBarType::kMmio32, 0x4000, /*prefetchable=*/true};
  bars[1] = PciBar{PciBarType::kIo, 0x20};
  root_->addDevice(2, std::make_shared<FakeDevice>(bars));
  EXPECT_EQ(ecamRead(2, 0x10), 0x00000008u);  // unassigned, prefetchable 32-bit memory
  ecamWrite(2, 0x10, 0xffffffff);
  EXPECT_EQ(ecamRead(2, 0x10), 0xffffc008u);
  ecamWrite(2, 0x10, 0xc0001234);  // low address bits are not writable
  EXPECT_EQ(ecamRead(2, 0x10), 0xc0000008u);
  EXPECT_EQ(ecamRead(2, 0x14), 0x00000001u);  // I/O
  type1Write(2, 0x14, 0xffffffff);
  EXPECT_EQ(type1Read(2, 0x14), 0xffffffe1u);
  EXPECT_EQ(ecamRead(2, 0x18), 0u);  // unused BARs read 0 and ignore writes
  ecamWrite(2, 0x18, 0xffffffff);
  EXPECT_EQ(ecamRead(2, 0x18), 0u);
  // Byte-wise BAR writes merge into the register.
  ecamWrite(2, 0x13, 0xd0, 1);
  EXPECT_EQ(ecamRead(2, 0x10), 0xd0000008u);
}

TEST_F(PciRootTest, SizingA64BitBar) {
  std::array<PciBar, kPciBarCount> bars{};
  bars[0] = PciBar{PciBarType::kMmio64, 0x100000};
  bars[2] = PciBar{PciBarType::kMmio64, 16ull << 30, /*prefetchable=*/true};
  root_->addDevice(3, std::make_shared<FakeDevice>(bars));
  EXPECT_EQ(ecamRead(3, 0x10), 0x00000004u);
  ecamWrite(3, 0x10, 0xffffffff);
  ecamWrite(3, 0x14, 0xffffffff);
  EXPECT_EQ(ecamRead(3, 0x10), 0xfff00004u);
  EXPECT_EQ(ecamRead(3, 0x14), 0xffffffffu);
  ecamWrite(3, 0x18, 0xffffffff);
  ecamWrite(3, 0x1c, 0xffffffff);
  EXPECT_EQ(ecamRead(3, 0x18), 0x0000000cu);  // 16 GiB: no writable bits in the low dword
  EXPECT_EQ(ecamRead(3, 0x1c), 0xfffffffcu);
  ecamWrite(3, 0x18, 0);
  ecamWrite(3, 0x1c, 0x10);  // 64 GiB
  EXPECT_EQ(ecamRead(3, 0x1c), 0x10u);
}

TEST_F(PciRootTest, BarMovesAreReportedOnlyWhileDecoding) {
  std::array<PciBar, kPciBarCount> bars{};
  bars[0] = PciBar{PciBarType::kMmio32, 0x1000};
  bars[2] = PciBar{PciBarType::kMmio64, 0x4000};
  auto device = std::make_shared<FakeDevice>(bars);
  root_->addDevice(4, device);

  // Sizing and programming with decoding off: nothing to report.
  ecamWrite(4, 0x10, 0xffffffff);
  ecamWrite(4, 0x10, 0xc0000000);
  ecamWrite(4, 0x18, 0xffffffff);
  ecamWrite(4, 0x1c, 0xffffffff);
  ecamWrite(4, 0x18, 0x00000000);
  ecamWrite(4, 0x1c, 0x00000001);
  EXPECT_TRUE(device->moves.empty());
  EXPECT_EQ(root_->barAddress(Bdf{0, 4, 0}, 0), std::nullopt);

  ecamWrite(4, 0x04, pci::kCommandMemory, 2);
  EXPECT_EQ(device->moves, (std::vector<Move>{{0, std::nullopt, 0xc0000000},
                                              {2, std::nullopt, 0x100000000}}));
  EXPECT_EQ(root_->barAddress(Bdf{0, 4, 0}, 2), 0x100000000u);
  device->moves.clear();

  ecamWrite(4, 0x10, 0xc0010000);  // moved while decoding
  EXPECT_EQ(device->moves, (std::vector<Move>{{0, 0xc0000000, 0xc0010000}}));
  device->moves.clear();
  ecamWrite(4, 0x10, 0xffffffff);  // sizing with decoding on: 0xfffff000 still fits
  ecamWrite(4, 0x10, 0xc0010000);
  EXPECT_EQ(device->moves.size(), 2u);
  device->moves.clear();

  type1Write(4, 0x04, 0, 2);  // decoding off through CF8/CFC
  EXPECT_EQ(device->moves, (std::vector<Move>{{0, 0xc0010000, std::nullopt},
                                              {2, 0x100000000, std::nullopt}}));
  EXPECT_EQ(root_->barAddress(Bdf{0, 4, 0}, 0), std::nullopt);
  device->moves.clear();
  ecamWrite(4, 0x04, pci::kCommandIo, 2);  // I/O decoding does not map memory BARs
  EXPECT_TRUE(device->moves.empty());
}

TEST_F(PciRootTest, PreassignedBarsAndInitialDecoding) {
  std::array<PciBar, kPciBarCount> bars{};
  bars[1] = PciBar{PciBarType::kMmio32, 0x2000, false, 0xc0002000};
  auto device = std::make_shared<FakeDevice>(bars);
  device->config.set16(pci::kCommand, pci::kCommandMemory);
  root_->addDevice(6, device);
  EXPECT_EQ(ecamRead(6, 0x14), 0xc0002000u);
  EXPECT_EQ(device->moves, (std::vector<Move>{{1, std::nullopt, 0xc0002000}}));
  EXPECT_EQ(root_->barAddress(Bdf{0, 6, 0}, 1), 0xc0002000u);
  EXPECT_EQ(root_->barAddress(Bdf{0, 6, 0}, 7), std::nullopt);
}

TEST_F(PciRootTest, ResetControlSharesPort0xCF9) {
  class Recorder : public BusDevice {
   public:
    void read(uint64_t, std::span<uint8_t> data) override { data[0] = 0x02; }
    void write(uint64_t offset, std::span<const uint8_t> data) override {
      writes.push_back(static_cast<uint8_t>(offset << 4 | data[0]));
    }
    std::vector<uint8_t> writes;
  };
  auto reset = std::make_shared<Recorder>();
  PciConfigIo io(root_, reset, log_);
  const uint8_t value = layout::kResetValue;
  io.write(layout::kResetPort - layout::kPciConfigAddressPort, {&value, 1});
  EXPECT_EQ(reset->writes, (std::vector<uint8_t>{layout::kResetValue}));
  uint8_t read = 0;
  io.read(1, {&read, 1});
  EXPECT_EQ(read, 0x02);
  const uint8_t dword[4] = {0x00, 0x00, 0x00, 0x80};
  io.write(0, dword);  // CONFIG_ADDRESS, not the reset register
  EXPECT_EQ(reset->writes.size(), 1u);
}

TEST(PciConfigSpaceTest, MasksAndCapabilities) {
  PciConfigSpace config(PciIds{.vendor = 0x1af4, .device = 0x1041, .classCode = 0x020000,
                               .revision = 1, .subsystemVendor = 0x1af4, .subsystem = 1});
  EXPECT_EQ(config.get32(0x08), 0x02000001u);
  EXPECT_EQ(config.get16(pci::kSubsystemId), 1);
  const uint8_t ones[4] = {0xff, 0xff, 0xff, 0xff};
  config.write(pci::kCommand, ones);
  EXPECT_EQ(config.get16(pci::kCommand), 0x0547);
  config.set16(pci::kStatus, 0x8100);  // detected parity error, master data parity error
  const uint8_t clear[2] = {0x00, 0x80};
  config.write(pci::kStatus, clear);
  EXPECT_EQ(config.get16(pci::kStatus), 0x0100);
  config.write(pci::kVendorId, ones);
  EXPECT_EQ(config.get16(pci::kVendorId), 0x1af4);

  uint16_t msix = config.addCapability(0x11, 12);
  uint16_t vendor = config.addCapability(0x09, 5);
  EXPECT_EQ(msix, 0x40);
  EXPECT_EQ(vendor, 0x4c);
  EXPECT_EQ(config.get8(pci::kCapabilitiesPointer), 0x40);
  EXPECT_EQ(config.get8(0x41), 0x4c);
  EXPECT_EQ(config.get8(0x4c), 0x09);
  EXPECT_EQ(config.get8(0x4d), 0x00);
  EXPECT_EQ(config.get16(pci::kStatus) & pci::kStatusCapabilities, pci::kStatusCapabilities);
  EXPECT_EQ(config.addCapability(0x10, 8), 0x54);  // dword aligned after 5 bytes
  EXPECT_THROW(config.addCapability(0x10, 0xb0), Error);
  EXPECT_THROW(config.get32(kPciConfigSpaceSize - 2), Error);
  uint8_t beyond[2] = {};
  config.read(kPciConfigSpaceSize - 1, beyond);
  EXPECT_EQ(beyond[1], 0xff);
}

}  // namespace
}  // namespace clonevm::vmm
