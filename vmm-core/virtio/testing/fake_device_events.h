#pragma once
// Test double for the KVM side of a device: records ioeventfds, MSI routes and irqfds, and
// notes in `violations` what KVM would refuse (an irqfd without a route, a route removed
// under an irqfd, an eventfd registered twice). It does not throw for those, since the
// transport would catch that and carry on; tests check `violations` instead. Test-only.

#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "common/error.h"
#include "vmm-core/kvm/device_events.h"

namespace clonevm::vmm::virtio_testing {

class FakeDeviceEvents : public IoEventRegistrar, public MsiInterruptController {
 public:
  struct Doorbell {
    uint64_t address;
    uint32_t length;
    int fd;
    auto operator<=>(const Doorbell&) const = default;
  };

  void addIoeventfd(uint64_t address, uint32_t length, int fd) override {
    check(doorbells.insert({address, length, fd}).second,
          fmt::format("ioeventfd {:#x} registered twice", address));
  }
  void removeIoeventfd(uint64_t address, uint32_t length, int fd) override {
    check(doorbells.erase({address, length, fd}) == 1,
          fmt::format("ioeventfd {:#x} not registered", address));
  }
  bool anyLengthIoeventfds() const override { return anyLength; }

  uint32_t addMsiRoute(const MsiMessage& message) override {
    if (failRoutes) throw Error("KVM_SET_GSI_ROUTING: No space left on device");
    uint32_t gsi = nextGsi++;
    routes[gsi] = message;
    ++routeCommits;
    return gsi;
  }
  void updateMsiRoute(uint32_t gsi, const MsiMessage& message) override {
    check(routes.contains(gsi), fmt::format("GSI {} has no route", gsi));
    routes[gsi] = message;
    ++routeCommits;
  }
  void removeMsiRoute(uint32_t gsi) override {
    check(!gsiHasIrqfd(gsi), fmt::format("route of GSI {} removed under an irqfd", gsi));
    check(routes.erase(gsi) == 1, fmt::format("GSI {} has no route", gsi));
    ++routeCommits;
  }
  void addIrqfd(int fd, uint32_t gsi) override {
    if (failIrqfds) throw Error("KVM_IRQFD: Resource busy");
    check(routes.contains(gsi), fmt::format("irqfd on GSI {} without a route", gsi));
    check(!gsiOf(fd), fmt::format("eventfd {} already an irqfd", fd));
    irqfds.insert({fd, gsi});
  }
  void removeIrqfd(int fd, uint32_t gsi) override {
    check(irqfds.erase({fd, gsi}) == 1,
          fmt::format("irqfd {} on GSI {} not registered", fd, gsi));
  }

  bool gsiHasIrqfd(uint32_t gsi) const {
    for (const auto& [fd, g] : irqfds) {
      if (g == gsi) return true;
    }
    return false;
  }
  std::optional<uint32_t> gsiOf(int fd) const {
    for (const auto& [f, gsi] : irqfds) {
      if (f == fd) return gsi;
    }
    return std::nullopt;
  }

  void check(bool ok, std::string what) {
    if (!ok) violations.push_back(std::move(what));
  }

  std::set<Doorbell> doorbells;
  std::map<uint32_t, MsiMessage> routes;
  std::set<std::pair<int, uint32_t>> irqfds;
  uint32_t nextGsi = 24;
  int routeCommits = 0;
  bool failRoutes = false;
  bool failIrqfds = false;
  bool anyLength = false;
  std::vector<std::string> violations;
};

}  // namespace clonevm::vmm::virtio_testing
