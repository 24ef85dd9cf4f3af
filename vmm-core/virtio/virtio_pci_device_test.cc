#include "vmm-core/virtio/virtio_pci_device.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <map>
#include <optional>
#include <set>
#include <vector>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "common/error.h"
#include "vmm-core/devices/pci_root.h"
#include "vmm-core/virtio/testing/fake_device_events.h"
#include "vmm-core/virtio/testing/virtio_pci_test_driver.h"
#include "vmm-core/virtio/virtio.h"

namespace clonevm::vmm {
namespace {

using namespace virtio_pci;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kFeatureBlkSizeMax = uint64_t{1} << 1;  // a device feature bit
constexpr uint64_t kBarAddress = 0x40'0000'0000;           // somewhere in a 64-bit window
constexpr uint64_t kMovedBarAddress = 0x80'0000'0000;

bool readable(int fd) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, 0) == 1;
}

uint64_t drain(int fd) {
  uint64_t count = 0;
  return ::read(fd, &count, sizeof(count)) == sizeof(count) ? count : 0;
}

void signal(int fd) {
  uint64_t one = 1;
  ASSERT_EQ(::write(fd, &one, sizeof(one)), 8);
}

class FakeBackend : public VirtioDeviceBackend {
 public:
  uint32_t deviceType() const override { return type; }
  uint16_t numQueues() const override { return queues; }
  uint16_t maxQueueSize() const override { return maxSize; }
  uint64_t deviceFeatures() const override { return features; }
  bool acceptFeatures(uint64_t f) override { return !refuseFeatures || f != refusedFeatures; }
  uint32_t configSize() const override { return static_cast<uint32_t>(config.size()); }
  void readConfig(uint32_t offset, std::span<uint8_t> data) override {
    configReads.emplace_back(offset, data.size());
    std::copy_n(config.begin() + offset, data.size(), data.begin());
  }
  void writeConfig(uint32_t offset, std::span<const uint8_t> data) override {
    std::copy(data.begin(), data.end(), config.begin() + offset);
  }
  void activate(const VirtioActivationInfo& info) override {
    if (failActivation) throw Error("backend is not connected");
    activations.push_back(info);
  }
  void reset() override { ++resets; }
  void statusChanged(uint8_t oldStatus, uint8_t newStatus) override {
    statusChanges.emplace_back(oldStatus, newStatus);
  }

  uint32_t type = virtio::kTypeBlock;
  uint16_t queues = 2;
  uint16_t maxSize = 256;
  uint64_t features = virtio::feature(virtio::kFeatureEventIdx) |
                      virtio::feature(virtio::kFeatureIndirectDesc) | kFeatureBlkSizeMax |
                      virtio::feature(virtio::kFeatureNotificationData) |  // dropped by transport
                      virtio::feature(virtio::kFeatureRingReset);          // dropped by transport
  bool refuseFeatures = false;
  uint64_t refusedFeatures = 0;
  bool failActivation = false;
  std::vector<uint8_t> config = {0x00, 0x10, 0, 0, 0, 0, 0, 0, 0x00, 0x02, 0, 0};
  std::vector<VirtioActivationInfo> activations;
  std::vector<std::pair<uint32_t, size_t>> configReads;
  std::vector<std::pair<uint8_t, uint8_t>> statusChanges;
  int resets = 0;
};

using virtio_testing::msiFor;

class VirtioPciDeviceTest : public ::testing::Test,
                            protected virtio_testing::VirtioPciTestDriver {
 protected:
  using FakeEvents = virtio_testing::FakeDeviceEvents;

  VirtioPciDeviceTest()
      : log_("test", std::make_shared<spdlog::sinks::null_sink_mt>()),
        memory_(GuestMemory::create(16 * kMiB)),
        backend_(std::make_shared<FakeBackend>()) {}

  // The device (held by the driver base) must go before events_ and memory_.
  void TearDown() override {
    detach();
    for (const auto& violation : events_.violations) ADD_FAILURE() << violation;
  }

  // Builds the device (tests may tweak backend_ first) and plugs it into a root bus.
  void plug(uint64_t barAddress = 0) {
    attach(std::make_shared<VirtioPciDevice>(backend_, memory_, events_, events_, log_,
                                             barAddress),
           log_);
  }

  static constexpr QueueSetup kQueue0{256, 0x10000, 0x11000, 0x12000, 1};
  static constexpr QueueSetup kQueue1{128, 0x20000, 0x21000, 0x22000, 2};

  // The whole of a virtio-blk probe: 2 queues, per-queue vectors, DRIVER_OK.
  void bringUp() {
    programBar(kBarAddress);
    enableMsix(3);
    ASSERT_TRUE(negotiate());
    setCommon(kMsixConfig, 0, 2);
    ASSERT_EQ(common(kMsixConfig, 2), 0u);
    setupQueue(0, kQueue0);
    setupQueue(1, kQueue1);
    addStatus(virtio::kStatusDriverOk);
  }

  spdlog::logger log_;
  GuestMemory memory_;
  std::shared_ptr<FakeBackend> backend_;
  FakeEvents events_;
};

TEST_F(VirtioPciDeviceTest, PciIdentityAndCapabilities) {
  plug();
  EXPECT_EQ(cfgRead(pci::kVendorId, 2), 0x1af4u);
  EXPECT_EQ(cfgRead(pci::kDeviceId, 2), 0x1042u);  // 0x1040 + block
  EXPECT_EQ(cfgRead(pci::kRevisionId, 1), 1u);
  EXPECT_EQ(cfgRead(pci::kRevisionId, 4) >> 8, 0x018000u);
  EXPECT_EQ(cfgRead(pci::kSubsystemVendorId, 2), 0x1af4u);
  EXPECT_GE(cfgRead(pci::kSubsystemId, 2), 0x40u);
  EXPECT_EQ(cfgRead(pci::kInterruptPin, 1), 0u);  // MSI-X only

  // BAR 0: 64-bit memory, sized by the all-ones protocol.
  cfgWrite(pci::kBar0, 0xffffffff);
  cfgWrite(pci::kBar0 + 4, 0xffffffff);
  uint64_t sized = cfgRead(pci::kBar0) | uint64_t{cfgRead(pci::kBar0 + 4)} << 32;
  EXPECT_EQ(sized & 0xf, 0x4u);  // 64-bit, not prefetchable
  EXPECT_EQ(~(sized & ~0xfull) + 1, device_->layout().size);

  ASSERT_NE(caps_.common, 0);
  ASSERT_NE(caps_.notify, 0);
  ASSERT_NE(caps_.isr, 0);
  ASSERT_NE(caps_.device, 0);
  ASSERT_NE(caps_.pciCfg, 0);
  ASSERT_NE(caps_.msix, 0);
  for (uint16_t cap : {caps_.common, caps_.notify, caps_.isr, caps_.device}) {
    EXPECT_EQ(cfgRead(cap + kCapBar, 1), 0u);
    uint32_t offset = capOffset(cap);
    uint32_t length = cfgRead(cap + kCapLength);
    EXPECT_GT(length, 0u);
    EXPECT_LE(uint64_t{offset} + length, device_->layout().size);
  }
  EXPECT_EQ(cfgRead(caps_.common + 2, 1), 16u);  // cap_len
  EXPECT_GE(cfgRead(caps_.common + kCapLength), 0x38u);  // sizeof(virtio_pci_common_cfg)
  EXPECT_EQ(cfgRead(caps_.notify + 2, 1), 20u);
  EXPECT_EQ(cfgRead(caps_.notify + kCapNotifyMultiplier), 4u);
  EXPECT_GE(cfgRead(caps_.notify + kCapLength), 2u * 4);  // a doorbell per queue
  EXPECT_EQ(cfgRead(caps_.device + kCapLength), backend_->config.size());
  EXPECT_EQ(cfgRead(caps_.pciCfg + 2, 1), 20u);

  // MSI-X: numQueues + 1 vectors, table and PBA in BAR 0, disabled at reset.
  uint32_t control = cfgRead(caps_.msix + kMsixControl, 2);
  EXPECT_EQ((control & 0x7ff) + 1, 3u);
  EXPECT_EQ(control & (kMsixControlEnable | kMsixControlFunctionMask), 0u);
  EXPECT_EQ(cfgRead(caps_.msix + kMsixTable) & 7, 0u);
  EXPECT_EQ(cfgRead(caps_.msix + kMsixPba) & 7, 0u);
  cfgWrite(caps_.msix + kMsixControl, 0xffff, 2);  // the table size is read-only
  EXPECT_EQ(cfgRead(caps_.msix + kMsixControl, 2), 0xc002u);
}

TEST_F(VirtioPciDeviceTest, LinuxProbeActivatesTheBackendWithEverythingInTheKernel) {
  plug();
  EXPECT_TRUE(events_.doorbells.empty());  // BAR not decoded yet
  bringUp();

  EXPECT_EQ(status(), virtio::kStatusAcknowledge | virtio::kStatusDriver |
                          virtio::kStatusFeaturesOk | virtio::kStatusDriverOk);
  ASSERT_EQ(backend_->activations.size(), 1u);
  const VirtioActivationInfo& info = backend_->activations[0];
  EXPECT_EQ(info.memory, &memory_);
  // The offer, plus VERSION_1, minus the transport features this transport lacks.
  uint64_t expected = virtio::feature(virtio::kFeatureEventIdx) |
                      virtio::feature(virtio::kFeatureIndirectDesc) | kFeatureBlkSizeMax |
                      virtio::feature(virtio::kFeatureVersion1);
  EXPECT_EQ(info.features, expected);
  ASSERT_EQ(info.queues.size(), 2u);
  const QueueSetup setups[2] = {kQueue0, kQueue1};
  for (uint16_t i = 0; i < 2; ++i) {
    const VirtioQueueInfo& q = info.queues[i];
    EXPECT_EQ(q.index, i);
    EXPECT_EQ(q.size, setups[i].size);
    EXPECT_EQ(q.descTable, setups[i].desc);
    EXPECT_EQ(q.availRing, setups[i].driver);
    EXPECT_EQ(q.usedRing, setups[i].device);
    EXPECT_EQ(q.kickFd, device_->kickFd(i));
    EXPECT_EQ(q.callFd, device_->callFd(i));
  }
  EXPECT_TRUE(info.configChanged);

  // One 2-byte ioeventfd per queue on its doorbell.
  std::set<FakeEvents::Doorbell> doorbells = {
      {doorbell(0), 2, device_->kickFd(0)},
      {doorbell(1), 2, device_->kickFd(1)},
  };
  EXPECT_EQ(events_.doorbells, doorbells);
  EXPECT_EQ(doorbell(1) - doorbell(0), 4u);

  // One MSI route per vector in use, carrying the guest's table entry, and an irqfd for
  // each event source on its vector's GSI.
  ASSERT_EQ(events_.routes.size(), 3u);
  auto configGsi = events_.gsiOf(device_->configFd());
  auto queue0Gsi = events_.gsiOf(device_->callFd(0));
  auto queue1Gsi = events_.gsiOf(device_->callFd(1));
  ASSERT_TRUE(configGsi && queue0Gsi && queue1Gsi);
  EXPECT_EQ(events_.routes[*configGsi], msiFor(0x30, 0));
  EXPECT_EQ(events_.routes[*queue0Gsi], msiFor(0x31, 1));
  EXPECT_EQ(events_.routes[*queue1Gsi], msiFor(0x32, 2));
  EXPECT_EQ(events_.irqfds.size(), 3u);

  // The backend signalling a call eventfd goes to KVM, not to the transport: the PBA
  // stays clear and ISR is not touched.
  signal(device_->callFd(0));
  EXPECT_EQ(mmioRead(msixPba(), 4), 0u);
  EXPECT_EQ(mmioRead(capOffset(caps_.isr), 1), 0u);
  EXPECT_EQ(backend_->statusChanges.back().second, status());
}

TEST_F(VirtioPciDeviceTest, DoorbellsFollowTheBar) {
  plug(kBarAddress);  // placed by the VMM: decoded as soon as memory decoding is on
  EXPECT_TRUE(events_.doorbells.empty());
  bar_ = kBarAddress;
  cfgWrite(pci::kCommand, pci::kCommandMemory, 2);
  ASSERT_EQ(events_.doorbells.size(), 2u);
  EXPECT_TRUE(events_.doorbells.contains({doorbell(0), 2, device_->kickFd(0)}));

  cfgWrite(pci::kCommand, 0, 2);  // decoding off: no doorbell anywhere
  EXPECT_TRUE(events_.doorbells.empty());

  programBar(kMovedBarAddress);
  ASSERT_EQ(events_.doorbells.size(), 2u);
  for (const auto& d : events_.doorbells) {
    EXPECT_GE(d.address, kMovedBarAddress);
    EXPECT_LT(d.address, kMovedBarAddress + device_->layout().size);
  }
  EXPECT_TRUE(events_.doorbells.contains({doorbell(1), 2, device_->kickFd(1)}));

  // Moving the low half while decoding stays on moves the doorbells in one step.
  cfgWrite(pci::kBar0, static_cast<uint32_t>(kMovedBarAddress + device_->layout().size));
  bar_ = kMovedBarAddress + device_->layout().size;
  EXPECT_TRUE(events_.doorbells.contains({doorbell(0), 2, device_->kickFd(0)}));
  EXPECT_EQ(events_.doorbells.size(), 2u);

  detach();  // the last references: the destructor unregisters everything
  EXPECT_TRUE(events_.doorbells.empty());
  EXPECT_TRUE(events_.routes.empty());
}

TEST_F(VirtioPciDeviceTest, AnyWidthDoorbellsWhereKvmAllowsThem) {
  events_.anyLength = true;
  plug();
  programBar(kBarAddress);
  std::set<FakeEvents::Doorbell> doorbells = {
      {doorbell(0), 0, device_->kickFd(0)},
      {doorbell(1), 0, device_->kickFd(1)},
  };
  EXPECT_EQ(events_.doorbells, doorbells);
  cfgWrite(pci::kCommand, 0, 2);
  EXPECT_TRUE(events_.doorbells.empty());
}

TEST_F(VirtioPciDeviceTest, DestroyingAnActiveDeviceStopsTheBackend) {
  plug();
  bringUp();
  ASSERT_EQ(backend_->resets, 1);  // the probe's reset
  detach();
  EXPECT_EQ(backend_->resets, 2);
  EXPECT_TRUE(events_.irqfds.empty());
  EXPECT_TRUE(events_.routes.empty());
  EXPECT_TRUE(events_.doorbells.empty());
}

TEST_F(VirtioPciDeviceTest, DoorbellsThatReachTheCoreStillKick) {
  plug();
  bringUp();
  EXPECT_FALSE(readable(device_->kickFd(1)));
  mmioWrite(doorbell(1) - bar_, 1, 4);  // a 4-byte write: no ioeventfd match, an exit
  EXPECT_EQ(drain(device_->kickFd(1)), 1u);
  EXPECT_EQ(device_->doorbellExits(), 1u);
  mmioWrite(doorbell(1) - bar_ + 2, 1, 2);  // not a doorbell
  EXPECT_FALSE(readable(device_->kickFd(1)));
  EXPECT_EQ(mmioRead(doorbell(0) - bar_, 2), 0u);
}

TEST_F(VirtioPciDeviceTest, MaskedVectorsPendInThePbaAndFireOnUnmask) {
  plug();
  bringUp();
  auto gsi = events_.gsiOf(device_->callFd(1));
  ASSERT_TRUE(gsi);

  setVectorMasked(2, true);  // queue 1's vector
  EXPECT_FALSE(events_.gsiOf(device_->callFd(1)));  // no irqfd while masked
  EXPECT_TRUE(events_.routes.contains(*gsi));        // the route stays
  EXPECT_EQ(mmioRead(msixPba(), 4), 0u);

  signal(device_->callFd(1));  // the backend completes a request meanwhile
  EXPECT_EQ(mmioRead(msixPba(), 4), 1u << 2);
  EXPECT_EQ(mmioRead(msixPba(), 8), 1u << 2);  // qword access too

  // Linux moves the vector while masked; the route picks it up on unmask.
  writeMsixEntry(2, msiFor(0x45, 3));
  EXPECT_EQ(events_.routes[*gsi], msiFor(0x32, 2));
  setVectorMasked(2, false);
  EXPECT_EQ(events_.gsiOf(device_->callFd(1)), gsi);
  EXPECT_EQ(events_.routes[*gsi], msiFor(0x45, 3));
  EXPECT_EQ(mmioRead(msixPba(), 4), 0u);
  // Delivered once: the pending count became one fresh signal for the irqfd.
  EXPECT_EQ(drain(device_->callFd(1)), 1u);

  // The function mask masks every vector the same way.
  cfgWrite(caps_.msix + kMsixControl, cfgRead(caps_.msix + kMsixControl, 2) | kMsixControlFunctionMask, 2);
  EXPECT_TRUE(events_.irqfds.empty());
  device_->signalConfigChange();
  EXPECT_EQ(mmioRead(msixPba(), 4), 1u << 0);
  cfgWrite(caps_.msix + kMsixControl, cfgRead(caps_.msix + kMsixControl, 2) & ~kMsixControlFunctionMask, 2);
  EXPECT_EQ(events_.irqfds.size(), 3u);

  // MSI-X disabled: no routes at all. Enabled again: back.
  cfgWrite(caps_.msix + kMsixControl, 0, 2);
  EXPECT_TRUE(events_.irqfds.empty());
  EXPECT_TRUE(events_.routes.empty());
  EXPECT_EQ(mmioRead(msixPba(), 4), 0u);
  cfgWrite(caps_.msix + kMsixControl, kMsixControlEnable, 2);
  EXPECT_EQ(events_.routes.size(), 3u);
  EXPECT_EQ(events_.irqfds.size(), 3u);
}

TEST_F(VirtioPciDeviceTest, RewritingAnUnmaskedEntryUpdatesTheRoute) {
  plug();
  bringUp();
  auto gsi = events_.gsiOf(device_->callFd(0));
  int commits = events_.routeCommits;
  // Older kernels rewrite an entry without masking it (affinity change).
  writeMsixEntry(1, msiFor(0x51, 1));
  EXPECT_EQ(events_.gsiOf(device_->callFd(0)), gsi);
  EXPECT_EQ(events_.routes[*gsi], msiFor(0x51, 1));
  EXPECT_GT(events_.routeCommits, commits);
  EXPECT_EQ(mmioRead(msixTable() + 16 + 8, 4), 0x4051u);
  EXPECT_EQ(mmioRead(msixTable() + 16, 8), 0xfee01000u);  // address as a qword

  // Queue vector changed to the config vector at run time: the irqfd follows.
  setCommon(kQueueSelect, 0, 2);
  setCommon(kQueueMsixVector, 0, 2);
  EXPECT_EQ(events_.gsiOf(device_->callFd(0)), events_.gsiOf(device_->configFd()));
  EXPECT_EQ(events_.routes.size(), 2u);  // vector 1 is unused now
}

TEST_F(VirtioPciDeviceTest, SharedVectorHasOneRouteAndAnIrqfdPerQueue) {
  plug();
  programBar(kBarAddress);
  enableMsix(2);
  ASSERT_TRUE(negotiate());
  setCommon(kMsixConfig, 0, 2);
  QueueSetup q0 = kQueue0, q1 = kQueue1;
  q0.vector = q1.vector = 1;  // vp_find_vqs_msix without per-queue vectors
  setupQueue(0, q0);
  setupQueue(1, q1);
  addStatus(virtio::kStatusDriverOk);
  EXPECT_EQ(events_.routes.size(), 2u);
  EXPECT_EQ(events_.irqfds.size(), 3u);
  EXPECT_EQ(events_.gsiOf(device_->callFd(0)), events_.gsiOf(device_->callFd(1)));
}

TEST_F(VirtioPciDeviceTest, ResetClearsEverything) {
  plug();
  bringUp();
  signal(device_->callFd(0));
  signal(device_->kickFd(1));
  setCommon(kDeviceStatus, 0, 1);

  EXPECT_EQ(status(), 0);
  EXPECT_EQ(backend_->resets, 2);  // negotiate() reset once at probe, and now
  EXPECT_TRUE(events_.irqfds.empty());
  EXPECT_TRUE(events_.routes.empty());
  EXPECT_EQ(events_.doorbells.size(), 2u);  // the BAR is still decoded
  EXPECT_FALSE(readable(device_->callFd(0)));
  EXPECT_FALSE(readable(device_->kickFd(1)));
  EXPECT_EQ(common(kMsixConfig, 2), kNoVector);
  EXPECT_EQ(common(kQueueSelect, 2), 0u);
  for (uint16_t i = 0; i < 2; ++i) {
    setCommon(kQueueSelect, i, 2);
    EXPECT_EQ(common(kQueueSize, 2), 256u);
    EXPECT_EQ(common(kQueueEnable, 2), 0u);
    EXPECT_EQ(common(kQueueMsixVector, 2), kNoVector);
    EXPECT_EQ(common(kQueueDesc, 8), 0u);
    EXPECT_EQ(common(kQueueDriver, 8), 0u);
    EXPECT_EQ(common(kQueueDevice, 8), 0u);
  }
  setCommon(kDriverFeatureSelect, 0, 4);
  EXPECT_EQ(common(kDriverFeature, 4), 0u);

  // And the device comes up again (the MSI-X table survives a virtio reset).
  ASSERT_TRUE(negotiate());
  setCommon(kMsixConfig, 0, 2);
  setupQueue(0, kQueue0);
  addStatus(virtio::kStatusDriverOk);
  EXPECT_EQ(backend_->activations.size(), 2u);
  EXPECT_EQ(backend_->activations[1].queues.size(), 1u);
  EXPECT_EQ(events_.irqfds.size(), 2u);
}

TEST_F(VirtioPciDeviceTest, FeatureNegotiationFollowsTheSpec) {
  plug();
  programBar(kBarAddress);
  uint64_t offered = deviceFeatures();
  EXPECT_TRUE(offered & virtio::feature(virtio::kFeatureVersion1));
  EXPECT_FALSE(offered & virtio::feature(virtio::kFeatureNotificationData));
  EXPECT_FALSE(offered & virtio::feature(virtio::kFeatureRingReset));
  setCommon(kDeviceFeatureSelect, 7, 4);
  EXPECT_EQ(common(kDeviceFeature, 4), 0u);

  // A feature the device does not offer.
  EXPECT_FALSE(negotiate(offered | virtio::feature(virtio::kFeatureRingPacked)));
  // A legacy driver (no VERSION_1).
  EXPECT_FALSE(negotiate(offered & ~virtio::feature(virtio::kFeatureVersion1)));
  // A transport feature that was filtered out of the offer.
  EXPECT_FALSE(negotiate(offered | virtio::feature(virtio::kFeatureNotificationData)));
  // The backend's own veto.
  backend_->refuseFeatures = true;
  backend_->refusedFeatures = offered;
  EXPECT_FALSE(negotiate(offered));
  backend_->refuseFeatures = false;

  // FEATURES_OK without ACKNOWLEDGE and DRIVER.
  setCommon(kDeviceStatus, 0, 1);
  setDriverFeatures(virtio::feature(virtio::kFeatureVersion1));
  setCommon(kDeviceStatus, virtio::kStatusFeaturesOk, 1);
  EXPECT_EQ(status() & virtio::kStatusFeaturesOk, 0);

  // A subset is fine; afterwards the features are frozen.
  ASSERT_TRUE(negotiate(virtio::feature(virtio::kFeatureVersion1)));
  setDriverFeatures(offered);
  setCommon(kDriverFeatureSelect, 0, 4);
  EXPECT_EQ(common(kDriverFeature, 4), 0u);
  setCommon(kDriverFeatureSelect, 1, 4);
  EXPECT_EQ(common(kDriverFeature, 4), 1u);  // bit 32
  setupQueue(0, kQueue0);
  addStatus(virtio::kStatusDriverOk);
  ASSERT_EQ(backend_->activations.size(), 1u);
  EXPECT_EQ(backend_->activations[0].features, virtio::feature(virtio::kFeatureVersion1));
}

TEST_F(VirtioPciDeviceTest, StatusRules) {
  plug();
  programBar(kBarAddress);
  addStatus(virtio::kStatusAcknowledge);
  addStatus(virtio::kStatusDriver);
  // DRIVER_OK before FEATURES_OK is ignored and activates nothing.
  addStatus(virtio::kStatusDriverOk);
  EXPECT_EQ(status(), virtio::kStatusAcknowledge | virtio::kStatusDriver);
  EXPECT_TRUE(backend_->activations.empty());
  // Clearing a bit is not a thing a driver may do.
  setCommon(kDeviceStatus, virtio::kStatusAcknowledge, 1);
  EXPECT_EQ(status(), virtio::kStatusAcknowledge | virtio::kStatusDriver);
  // FAILED is recorded and passed on.
  addStatus(virtio::kStatusFailed);
  EXPECT_EQ(status() & virtio::kStatusFailed, virtio::kStatusFailed);
  EXPECT_EQ(backend_->statusChanges.back().second, status());
  // Config generation and num_queues are read-only.
  setCommon(kConfigGeneration, 9, 1);
  EXPECT_EQ(common(kConfigGeneration, 1), 0u);
  setCommon(kNumQueues, 9, 2);
  EXPECT_EQ(common(kNumQueues, 2), 2u);
}

TEST_F(VirtioPciDeviceTest, HostileQueueProgrammingIsRefused) {
  plug();
  programBar(kBarAddress);
  enableMsix(3);
  ASSERT_TRUE(negotiate());

  // queue_select past num_queues: an absent queue, all zeros, writes dropped.
  setCommon(kQueueSelect, 2, 2);
  EXPECT_EQ(common(kQueueSelect, 2), 2u);
  EXPECT_EQ(common(kQueueSize, 2), 0u);
  EXPECT_EQ(common(kQueueNotifyOff, 2), 0u);
  setCommon(kQueueSize, 16, 2);
  setCommon(kQueueDesc, 0x1000, 8);
  setCommon(kQueueEnable, 1, 2);
  EXPECT_EQ(common(kQueueSize, 2), 0u);
  EXPECT_EQ(common(kQueueDesc, 8), 0u);
  EXPECT_EQ(common(kQueueEnable, 2), 0u);
  setCommon(kQueueSelect, 0xffff, 2);
  EXPECT_EQ(common(kQueueSize, 2), 0u);

  // Sizes: not a power of two, zero, above the maximum.
  setCommon(kQueueSelect, 0, 2);
  for (uint16_t bad : {3, 0, 512, 0xffff}) {
    setCommon(kQueueSize, bad, 2);
    EXPECT_EQ(common(kQueueSize, 2), 256u) << bad;
  }
  setCommon(kQueueSize, 64, 2);
  EXPECT_EQ(common(kQueueSize, 2), 64u);

  // Vectors past the table read back as NO_VECTOR, which Linux takes as -EBUSY.
  setCommon(kQueueMsixVector, 3, 2);
  EXPECT_EQ(common(kQueueMsixVector, 2), kNoVector);
  setCommon(kMsixConfig, 0x7ff, 2);
  EXPECT_EQ(common(kMsixConfig, 2), kNoVector);
  EXPECT_TRUE(events_.routes.empty());

  // Once enabled, the queue's setup is frozen; disabling by writing 0 is not allowed.
  setupQueue(0, kQueue0);
  setCommon(kQueueSize, 16, 2);
  setCommon(kQueueDesc, 0x40000, 8);
  setCommon(kQueueEnable, 0, 2);
  EXPECT_EQ(common(kQueueSize, 2), 256u);
  EXPECT_EQ(common(kQueueDesc, 8), kQueue0.desc);
  EXPECT_EQ(common(kQueueEnable, 2), 1u);
}

TEST_F(VirtioPciDeviceTest, RingsOutsideGuestMemoryNeedReset) {
  plug();
  programBar(kBarAddress);
  enableMsix(3);
  struct Case {
    const char* what;
    QueueSetup queue;
  };
  const Case cases[] = {
      {"descriptors past the end", {256, 16 * kMiB - 0x800, 0x11000, 0x12000, 1}},
      {"used ring straddling the end", {256, 0x10000, 0x11000, 16 * kMiB - 8, 1}},
      {"avail ring at 2^64 - 2", {256, 0x10000, ~uint64_t{1}, 0x12000, 1}},
      {"misaligned descriptors", {256, 0x10008, 0x11000, 0x12000, 1}},
      {"misaligned used ring", {256, 0x10000, 0x11000, 0x12002, 1}},
      {"in the PCI hole", {256, 0xd0000000, 0x11000, 0x12000, 1}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    ASSERT_TRUE(negotiate());
    setCommon(kMsixConfig, 0, 2);
    setupQueue(0, c.queue);
    addStatus(virtio::kStatusDriverOk);
    EXPECT_EQ(status() & virtio::kStatusNeedsReset, virtio::kStatusNeedsReset);
    EXPECT_TRUE(status() & virtio::kStatusDriverOk);
    EXPECT_TRUE(backend_->activations.empty());
    // The driver is told through a config interrupt (ISR bit 1, config eventfd).
    EXPECT_EQ(mmioRead(capOffset(caps_.isr), 1), kIsrConfig);
    EXPECT_EQ(mmioRead(capOffset(caps_.isr), 1), 0u);  // read clears
    EXPECT_TRUE(readable(device_->configFd()));
    // Writing the status back keeps NEEDS_RESET; only a reset clears it.
    addStatus(0);
    EXPECT_TRUE(status() & virtio::kStatusNeedsReset);
  }
  setCommon(kDeviceStatus, 0, 1);
  EXPECT_EQ(status(), 0);
}

TEST_F(VirtioPciDeviceTest, BackendActivationFailureNeedsReset) {
  backend_->failActivation = true;
  plug();
  bringUp();
  EXPECT_TRUE(status() & virtio::kStatusNeedsReset);
  uint8_t generation = static_cast<uint8_t>(common(kConfigGeneration, 1));
  EXPECT_GT(generation, 0);
  backend_->failActivation = false;
  ASSERT_TRUE(negotiate());
  EXPECT_EQ(status() & virtio::kStatusNeedsReset, 0);
}

TEST_F(VirtioPciDeviceTest, InterruptRoutingFailureNeedsResetInsteadOfCrashing) {
  plug();
  programBar(kBarAddress);
  enableMsix(3);
  ASSERT_TRUE(negotiate());
  events_.failRoutes = true;
  setCommon(kMsixConfig, 0, 2);
  EXPECT_TRUE(status() & virtio::kStatusNeedsReset);
  EXPECT_TRUE(events_.routes.empty());
  events_.failRoutes = false;
  ASSERT_TRUE(negotiate());
  setCommon(kMsixConfig, 0, 2);
  EXPECT_EQ(events_.routes.size(), 1u);

  // An irqfd that cannot be added keeps what was pending visible in the PBA.
  setVectorMasked(0, true);
  signal(device_->configFd());
  events_.failIrqfds = true;
  setVectorMasked(0, false);
  EXPECT_TRUE(status() & virtio::kStatusNeedsReset);
  EXPECT_TRUE(readable(device_->configFd()));
  events_.failIrqfds = false;
}

TEST_F(VirtioPciDeviceTest, OddAccessesAreHarmless) {
  plug();
  programBar(kBarAddress);
  uint64_t commonBase = capOffset(caps_.common);
  // Wrong widths on common config fields read 0 and are dropped.
  EXPECT_EQ(mmioRead(commonBase + kNumQueues, 1), 0u);
  EXPECT_EQ(mmioRead(commonBase + kNumQueues, 4), 0u);
  EXPECT_EQ(mmioRead(commonBase + kDeviceFeature + 1, 2), 0u);
  EXPECT_EQ(mmioRead(commonBase + kQueueDesc + 2, 4), 0u);
  mmioWrite(commonBase + kDeviceStatus, virtio::kStatusAcknowledge, 2);
  mmioWrite(commonBase + kDeviceStatus - 1, 0xffffffff, 4);
  EXPECT_EQ(status(), 0);
  mmioWrite(commonBase + kQueueSelect, 1, 1);
  EXPECT_EQ(common(kQueueSelect, 2), 0u);
  // Accesses that straddle the end of common config or of the BAR.
  EXPECT_EQ(mmioRead(commonBase + kCommonConfigSize - 2, 4), 0u);
  Bus bus("mmio");
  bus.insert(bar_, device_->layout().size, device_);
  uint8_t bytes[16] = {};
  EXPECT_FALSE(bus.read(bar_ + device_->layout().size - 2, {bytes, 4}));
  device_->read(device_->layout().size - 2, {bytes, 4});
  device_->write(device_->layout().size + 8, {bytes, 4});
  device_->read(0, {bytes, 16});  // wider than any register
  device_->write(0, {bytes, 0});
  // Device config beyond its size.
  uint64_t deviceBase = capOffset(caps_.device);
  EXPECT_EQ(mmioRead(deviceBase + backend_->config.size() - 2, 4), 0u);
  mmioWrite(deviceBase + backend_->config.size(), 0xff, 1);
  EXPECT_TRUE(backend_->configReads.empty());
  // MSI-X table: 1- and 2-byte or misaligned accesses.
  mmioWrite(msixTable() + 8, 0x1234, 2);
  mmioWrite(msixTable() + 2, 0x1234, 4);
  mmioWrite(msixTable() + 4, 0x1234, 8);
  EXPECT_EQ(mmioRead(msixTable() + 8, 4), 0u);
  EXPECT_EQ(mmioRead(msixTable() + 8, 2), 0u);
  EXPECT_EQ(mmioRead(msixTable() + 12, 4), 1u);  // still masked
  // The PBA is read-only.
  mmioWrite(msixPba(), 0xffffffff, 4);
  EXPECT_EQ(mmioRead(msixPba(), 4), 0u);
  // Gaps between the structures.
  EXPECT_EQ(mmioRead(capOffset(caps_.isr) + 0x100, 4), 0u);
  mmioWrite(capOffset(caps_.isr), 0xff, 1);
  EXPECT_EQ(mmioRead(capOffset(caps_.isr), 1), 0u);
}

TEST_F(VirtioPciDeviceTest, DeviceConfigGoesToTheBackend) {
  plug();
  programBar(kBarAddress);
  uint64_t deviceBase = capOffset(caps_.device);
  EXPECT_EQ(mmioRead(deviceBase, 8), 0x1000u);  // capacity, as virtio_cread64 reads it
  EXPECT_EQ(mmioRead(deviceBase + 8, 4), 0x200u);
  EXPECT_EQ(mmioRead(deviceBase + 9, 1), 0x02u);
  ASSERT_EQ(backend_->configReads.size(), 3u);
  EXPECT_EQ(backend_->configReads[0], (std::pair<uint32_t, size_t>{0, 8}));
  EXPECT_EQ(backend_->configReads[2], (std::pair<uint32_t, size_t>{9, 1}));
  mmioWrite(deviceBase + 4, 0xabcd, 2);
  EXPECT_EQ(backend_->config[4], 0xcd);
  EXPECT_EQ(backend_->config[5], 0xab);
}

TEST_F(VirtioPciDeviceTest, ConfigChangesBumpTheGenerationAndInterruptOnceLive) {
  plug();
  bringUp();
  ASSERT_EQ(backend_->activations.size(), 1u);
  uint8_t before = static_cast<uint8_t>(common(kConfigGeneration, 1));
  backend_->activations[0].configChanged();
  EXPECT_EQ(common(kConfigGeneration, 1), uint8_t(before + 1));
  EXPECT_TRUE(readable(device_->configFd()));  // → irqfd → config vector
  EXPECT_EQ(mmioRead(capOffset(caps_.isr), 1), kIsrConfig);

  // Before DRIVER_OK only the generation moves (spec: no notification before DRIVER_OK).
  setCommon(kDeviceStatus, 0, 1);
  drain(device_->configFd());
  device_->signalConfigChange();
  EXPECT_FALSE(readable(device_->configFd()));
  EXPECT_EQ(mmioRead(capOffset(caps_.isr), 1), 0u);
  EXPECT_EQ(common(kConfigGeneration, 1), uint8_t(before + 2));
}

TEST_F(VirtioPciDeviceTest, PciCfgWindowReachesBarZero) {
  plug();
  programBar(kBarAddress);
  auto windowAccess = [&](uint32_t offset, uint32_t length) {
    cfgWrite(caps_.pciCfg + kCapBar, 0, 1);
    cfgWrite(caps_.pciCfg + kCapOffset, offset);
    cfgWrite(caps_.pciCfg + kCapLength, length);
  };
  windowAccess(capOffset(caps_.common) + kNumQueues, 2);
  EXPECT_EQ(cfgRead(caps_.pciCfg + kCapPciCfgData, 2), 2u);
  windowAccess(capOffset(caps_.common) + kDeviceStatus, 1);
  cfgWrite(caps_.pciCfg + kCapPciCfgData, virtio::kStatusAcknowledge, 1);
  EXPECT_EQ(status(), virtio::kStatusAcknowledge);
  // A doorbell rung through the window.
  windowAccess(capOffset(caps_.notify) + 4, 2);
  cfgWrite(caps_.pciCfg + kCapPciCfgData, 1, 2);
  EXPECT_EQ(drain(device_->kickFd(1)), 1u);
  // Bad windows: another BAR, a 3-byte length, misaligned, past the BAR.
  cfgWrite(caps_.pciCfg + kCapBar, 2, 1);
  cfgWrite(caps_.pciCfg + kCapOffset, capOffset(caps_.common) + kNumQueues);
  cfgWrite(caps_.pciCfg + kCapLength, 2);
  cfgWrite(caps_.pciCfg + kCapPciCfgData, 0);
  EXPECT_EQ(cfgRead(caps_.pciCfg + kCapPciCfgData, 2), 0u);
  windowAccess(capOffset(caps_.common) + kNumQueues, 3);
  EXPECT_EQ(cfgRead(caps_.pciCfg + kCapPciCfgData, 2), 0u);
  windowAccess(capOffset(caps_.common) + kNumQueues + 1, 2);
  EXPECT_EQ(cfgRead(caps_.pciCfg + kCapPciCfgData, 2), 0u);
  windowAccess(static_cast<uint32_t>(device_->layout().size), 4);
  EXPECT_EQ(cfgRead(caps_.pciCfg + kCapPciCfgData, 4), 0u);
}

TEST_F(VirtioPciDeviceTest, PackedRingsTakeAnySize) {
  backend_->features |= virtio::feature(virtio::kFeatureRingPacked);
  plug();
  programBar(kBarAddress);
  enableMsix(3);
  ASSERT_TRUE(negotiate());
  setCommon(kQueueSelect, 0, 2);
  setCommon(kQueueSize, 100, 2);
  EXPECT_EQ(common(kQueueSize, 2), 100u);
  QueueSetup q{100, 0x10000, 0x11000, 0x11004, 1};  // event areas: 4 bytes each
  setupQueue(0, q);
  addStatus(virtio::kStatusDriverOk);
  ASSERT_EQ(backend_->activations.size(), 1u);
  EXPECT_EQ(backend_->activations[0].queues[0].size, 100);

  // Without PACKED negotiated, 100 is refused.
  ASSERT_TRUE(negotiate(deviceFeatures() & ~virtio::feature(virtio::kFeatureRingPacked)));
  setCommon(kQueueSelect, 0, 2);
  setCommon(kQueueSize, 100, 2);
  EXPECT_EQ(common(kQueueSize, 2), 256u);
}

TEST_F(VirtioPciDeviceTest, RejectsBackendsItCannotCarry) {
  backend_->queues = 0;
  EXPECT_THROW(plug(), Error);
  backend_->queues = 2;
  backend_->maxSize = 100;
  EXPECT_THROW(plug(), Error);
  backend_->maxSize = 256;
  backend_->config.resize(0x1001);
  EXPECT_THROW(plug(), Error);
  backend_->config.resize(0);
  plug();
  EXPECT_EQ(caps_.device, 0);  // no device config, no capability
  EXPECT_THROW(std::make_shared<VirtioPciDevice>(backend_, memory_, events_, events_, log_,
                                                 kBarAddress + 0x1000),
               Error);  // misaligned BAR
}

TEST_F(VirtioPciDeviceTest, SavedStateBringsAFreshDeviceBackLive) {
  plug(kBarAddress);
  bringUp();
  setVectorMasked(2, true);
  signal(device_->callFd(1));  // masked: pending, must still fire after the restore
  VirtioPciState state = device_->saveState();
  EXPECT_EQ(state.registers.status, status());
  EXPECT_EQ(state.queues[1].interruptPending, 1);
  EXPECT_EQ(state.queues[0].interruptPending, 0);

  // As a fork does: the same device built again (new eventfds), then the state loaded.
  detach();
  EXPECT_TRUE(events_.routes.empty() && events_.irqfds.empty() && events_.doorbells.empty());
  auto fresh = std::make_shared<FakeBackend>();
  backend_ = fresh;
  plug(kBarAddress);
  bar_ = kBarAddress;
  device_->restoreState(state);
  root_->refreshDecoding();

  EXPECT_EQ(status(), state.registers.status);
  ASSERT_EQ(fresh->activations.size(), 1u);
  const auto& info = fresh->activations[0];
  EXPECT_EQ(info.features, state.registers.negotiatedFeatures);
  ASSERT_EQ(info.queues.size(), 2u);
  EXPECT_EQ(info.queues[0].descTable, kQueue0.desc);
  EXPECT_EQ(info.queues[1].usedRing, kQueue1.device);
  EXPECT_EQ(info.queues[1].callFd, device_->callFd(1));
  std::set<FakeEvents::Doorbell> doorbells = {{doorbell(0), 2, device_->kickFd(0)},
                                              {doorbell(1), 2, device_->kickFd(1)}};
  EXPECT_EQ(events_.doorbells, doorbells);
  auto configGsi = events_.gsiOf(device_->configFd());
  auto queue0Gsi = events_.gsiOf(device_->callFd(0));
  ASSERT_TRUE(configGsi && queue0Gsi);
  EXPECT_EQ(events_.routes[*queue0Gsi], msiFor(0x31, 1));
  EXPECT_FALSE(events_.gsiOf(device_->callFd(1)));  // still masked
  EXPECT_EQ(mmioRead(msixPba(), 4), 0b100u);        // and pending
  setVectorMasked(2, false);
  EXPECT_TRUE(events_.gsiOf(device_->callFd(1)));
  EXPECT_TRUE(readable(device_->callFd(1)));  // delivered through the irqfd once unmasked
  EXPECT_EQ(common(kQueueDesc, 8), kQueue1.desc);  // queue_select kept (1, set last)
}

TEST_F(VirtioPciDeviceTest, RestoreRefusesStateOfAnotherShapeOrAUsedDevice) {
  plug(kBarAddress);
  bringUp();
  VirtioPciState state = device_->saveState();
  EXPECT_THROW(device_->restoreState(state), Error);  // already live

  detach();
  backend_ = std::make_shared<FakeBackend>();
  backend_->queues = 3;
  plug(kBarAddress);
  EXPECT_THROW(device_->restoreState(state), Error);  // 2 queues saved, 3 here

  detach();
  backend_ = std::make_shared<FakeBackend>();
  backend_->features = 0;
  plug(kBarAddress);
  EXPECT_THROW(device_->restoreState(state), Error);  // features this device never offered

  // Rings outside guest memory (a damaged state that passed the checksum) are not used: the
  // device comes back needing a reset, as for a driver that programmed them.
  detach();
  backend_ = std::make_shared<FakeBackend>();
  plug(kBarAddress);
  bar_ = kBarAddress;
  state.queues[0].desc = 64 * kMiB;
  device_->restoreState(state);
  EXPECT_TRUE(backend_->activations.empty());
  EXPECT_TRUE(status() & virtio::kStatusNeedsReset);
}

TEST(VirtioPciBarLayoutTest, StructuresDoNotOverlap) {
  for (uint16_t queues : {1, 2, 63, 64, 1024}) {
    auto layout = VirtioPciBarLayout::forQueues(queues);
    EXPECT_LE(layout.common + kCommonConfigSize, layout.isr);
    EXPECT_LT(layout.isr, layout.device);
    EXPECT_LE(layout.device + 0x1000, layout.notify);
    EXPECT_LE(layout.notify + layout.notifyLength, layout.msixTable);
    EXPECT_LE(layout.msixTable + (queues + 1u) * kMsixEntrySize, layout.msixPba);
    EXPECT_LE(layout.msixPba + (queues + 1u + 63) / 64 * 8, layout.size);
    EXPECT_TRUE(std::has_single_bit(layout.size));
    EXPECT_EQ(layout.msixTable % 0x1000, 0u);
  }
}

}  // namespace
}  // namespace clonevm::vmm
