#include "vmm-core/kvm/gsi_routing.h"

#include "common/error.h"
#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {
namespace {

constexpr uint32_t kPicPins = 16;  // GSIs wired to both PICs as well as the IOAPIC

kvm_irq_routing_entry irqchipRoute(uint32_t gsi, uint32_t chip, uint32_t pin) {
  kvm_irq_routing_entry entry{};
  entry.gsi = gsi;
  entry.type = KVM_IRQ_ROUTING_IRQCHIP;
  entry.u.irqchip.irqchip = chip;
  entry.u.irqchip.pin = pin;
  return entry;
}

// The routes KVM_CREATE_IRQCHIP installs on x86 (the kernel's default_routing[]): every
// IOAPIC pin is its own GSI, and GSIs 0..15 also reach PIC pin gsi % 8 on the master
// (0..7) or slave (8..15). Dropping these would cut off the serial port, RTC and SCI.
std::vector<kvm_irq_routing_entry> buildTable(const std::map<uint32_t, MsiMessage>& msi) {
  std::vector<kvm_irq_routing_entry> table;
  table.reserve(layout::kIoapicGsiCount + kPicPins + msi.size());
  for (uint32_t gsi = 0; gsi < layout::kIoapicGsiCount; ++gsi) {
    table.push_back(irqchipRoute(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    if (gsi < kPicPins) {
      table.push_back(irqchipRoute(gsi, gsi < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE,
                                   gsi % 8));
    }
  }
  for (const auto& [gsi, message] : msi) {
    kvm_irq_routing_entry entry{};
    entry.gsi = gsi;
    entry.type = KVM_IRQ_ROUTING_MSI;
    entry.u.msi.address_lo = static_cast<uint32_t>(message.address);
    entry.u.msi.address_hi = static_cast<uint32_t>(message.address >> 32);
    entry.u.msi.data = message.data;
    table.push_back(entry);
  }
  return table;
}

}  // namespace

GsiRouting::GsiRouting(Commit commit, uint32_t maxRoutes)
    : commit_(std::move(commit)), maxRoutes_(maxRoutes) {
  require(commit_ != nullptr, "GSI routing: no commit function");
  require(maxRoutes_ > layout::kIoapicGsiCount + kPicPins,
          "GSI routing: KVM allows only {} routes", maxRoutes_);
}

uint32_t GsiRouting::firstMsiGsi() { return layout::kIoapicGsiCount; }

uint32_t GsiRouting::addMsi(const MsiMessage& message) {
  std::lock_guard lock(mutex_);
  size_t entries = layout::kIoapicGsiCount + kPicPins + msi_.size();
  require(entries < maxRoutes_, "GSI routing: all {} routes are in use", maxRoutes_);
  uint32_t gsi = firstMsiGsi();
  for (const auto& [used, unused] : msi_) {
    if (used != gsi) break;  // the map is sorted: the first gap is the lowest free GSI
    ++gsi;
  }
  require(gsi < maxRoutes_, "GSI routing: no free GSI below {}", maxRoutes_);
  auto next = msi_;
  next[gsi] = message;
  commitLocked(next);
  return gsi;
}

void GsiRouting::updateMsi(uint32_t gsi, const MsiMessage& message) {
  std::lock_guard lock(mutex_);
  auto it = msi_.find(gsi);
  require(it != msi_.end(), "GSI routing: GSI {} is not an allocated MSI route", gsi);
  if (it->second == message) return;
  auto next = msi_;
  next[gsi] = message;
  commitLocked(next);
}

void GsiRouting::removeMsi(uint32_t gsi) {
  std::lock_guard lock(mutex_);
  require(msi_.contains(gsi), "GSI routing: GSI {} is not an allocated MSI route", gsi);
  auto next = msi_;
  next.erase(gsi);
  commitLocked(next);
}

std::vector<kvm_irq_routing_entry> GsiRouting::table() const {
  std::lock_guard lock(mutex_);
  return buildTable(msi_);
}

void GsiRouting::commitLocked(const std::map<uint32_t, MsiMessage>& next) {
  auto table = buildTable(next);
  commit_(table);  // throws: msi_ keeps the committed state
  msi_ = next;
}

}  // namespace clonevm::vmm
