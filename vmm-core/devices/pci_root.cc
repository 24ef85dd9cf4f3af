#include "vmm-core/devices/pci_root.h"

#include <algorithm>
#include <bit>

#include "common/error.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/devices/pci_config.h"
#include "vmm-core/devices/pci_host_bridge.h"

namespace clonevm::vmm {
namespace {

constexpr uint16_t kBarsStart = pci::kBar0;
constexpr uint16_t kBarsEnd = pci::kBar0 + 4 * kPciBarCount;

constexpr uint32_t kBarIo = 0x1;
constexpr uint32_t kBarMem64 = 0x4;
constexpr uint32_t kBarPrefetchable = 0x8;

uint64_t sizeMask(const PciBar& bar) { return ~(bar.size - 1); }

// The low dword bits that hold address, not type flags.
uint32_t lowAddressMask(const PciBar& bar) {
  uint32_t flags = bar.type == PciBarType::kIo ? 0x3u : 0xfu;
  return static_cast<uint32_t>(sizeMask(bar)) & ~flags;
}

void validateBars(const std::array<PciBar, kPciBarCount>& bars) {
  for (int i = 0; i < kPciBarCount; ++i) {
    const PciBar& bar = bars[i];
    if (bar.type == PciBarType::kNone) continue;
    require(std::has_single_bit(bar.size), "PCI BAR {}: size {:#x} is not a power of two", i,
            bar.size);
    require(bar.address % bar.size == 0, "PCI BAR {}: address {:#x} not aligned to its size", i,
            bar.address);
    switch (bar.type) {
      case PciBarType::kIo:
        require(bar.size >= 4 && bar.size <= 256, "PCI BAR {}: I/O size {:#x} not in 4..256", i,
                bar.size);
        require(!bar.prefetchable, "PCI BAR {}: I/O BARs are not prefetchable", i);
        require(bar.address + bar.size <= 0x10000, "PCI BAR {}: I/O address {:#x} too high", i,
                bar.address);
        break;
      case PciBarType::kMmio32:
        require(bar.size >= 16 && bar.size <= (1ull << 31),
                "PCI BAR {}: 32-bit memory size {:#x} not in 16..2 GiB", i, bar.size);
        require(bar.address + bar.size <= (1ull << 32), "PCI BAR {}: address {:#x} above 4 GiB",
                i, bar.address);
        break;
      case PciBarType::kMmio64:
        require(bar.size >= 16 && bar.size <= (1ull << 63),
                "PCI BAR {}: 64-bit memory size {:#x} too small or too large", i, bar.size);
        require(i + 1 < kPciBarCount && bars[i + 1].type == PciBarType::kNone,
                "PCI BAR {}: a 64-bit BAR needs BAR {} free", i, i + 1);
        break;
      case PciBarType::kNone:
        break;
    }
  }
}

}  // namespace

std::string Bdf::toString() const {
  return fmt::format("{:02x}:{:02x}.{:x}", bus, device, function);
}

PciRoot::PciRoot(spdlog::logger& log) : log_(log) {
  addDevice(0, std::make_shared<PciHostBridge>());
}

Bdf PciRoot::addDevice(uint8_t slot, std::shared_ptr<PciDevice> device) {
  require(device != nullptr, "PCI slot {}: no device", slot);
  require(slot < kSlotCount, "PCI slot {} does not exist (0..{})", slot, kSlotCount - 1);
  auto bars = device->bars();
  validateBars(bars);
  std::lock_guard lock(mutex_);
  require(!slots_[slot], "PCI slot {} is taken", slot);
  Function function{.device = std::move(device), .bars = {}};
  for (int i = 0; i < kPciBarCount; ++i) {
    if (bars[i].type == PciBarType::kNone) continue;
    function.bars[i].bar = bars[i];
    function.bars[i].address = bars[i].address;
    if (bars[i].type == PciBarType::kMmio64) function.bars[i + 1].upperHalf = true;
  }
  slots_[slot] = std::move(function);
  for (int i = 0; i < kPciBarCount; ++i) updateDecoding(*slots_[slot], i);
  return Bdf{0, slot, 0};
}

Bdf PciRoot::addDevice(std::shared_ptr<PciDevice> device) {
  uint8_t slot = 0;
  {
    std::lock_guard lock(mutex_);
    while (slot < kSlotCount && slots_[slot]) ++slot;
  }
  require(slot < kSlotCount, "no free PCI slot");
  return addDevice(slot, std::move(device));
}

PciRoot::Function* PciRoot::find(Bdf bdf) {
  if (bdf.bus != 0 || bdf.function != 0 || bdf.device >= kSlotCount) return nullptr;
  auto& slot = slots_[bdf.device];
  return slot ? &*slot : nullptr;
}

const PciRoot::Function* PciRoot::find(Bdf bdf) const {
  return const_cast<PciRoot*>(this)->find(bdf);
}

bool PciRoot::validAccess(Bdf bdf, uint16_t offset, size_t size, const char* what) const {
  bool ok = (size == 1 || size == 2 || size == 4) && offset < kPciConfigSpaceSize &&
            (offset & 3) + size <= 4;
  if (!ok) {
    log_.debug("pci {}: {}-byte {} at config offset {:#x} ignored", bdf.toString(), size, what,
               offset);
  }
  return ok;
}

void PciRoot::readConfig(Bdf bdf, uint16_t offset, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), 0xff);
  if (!validAccess(bdf, offset, data.size(), "read")) return;
  std::lock_guard lock(mutex_);
  Function* function = find(bdf);
  if (function == nullptr) return;
  if (offset >= kBarsStart && offset < kBarsEnd) {
    uint32_t value = readBar(*function, (offset - kBarsStart) / 4);
    for (size_t i = 0; i < data.size(); ++i) {
      data[i] = static_cast<uint8_t>(value >> (8 * ((offset & 3) + i)));
    }
    return;
  }
  function->device->readConfig(offset, data);
}

void PciRoot::writeConfig(Bdf bdf, uint16_t offset, std::span<const uint8_t> data) {
  if (!validAccess(bdf, offset, data.size(), "write")) return;
  std::lock_guard lock(mutex_);
  Function* function = find(bdf);
  if (function == nullptr) return;
  if (offset >= kBarsStart && offset < kBarsEnd) {
    int index = (offset - kBarsStart) / 4;
    uint32_t value = readBar(*function, index);
    for (size_t i = 0; i < data.size(); ++i) {
      int shift = 8 * ((offset & 3) + static_cast<int>(i));
      value = (value & ~(0xffu << shift)) | static_cast<uint32_t>(data[i]) << shift;
    }
    writeBar(*function, index, value);
    updateDecoding(*function, function->bars[index].upperHalf ? index - 1 : index);
    return;
  }
  function->device->writeConfig(offset, data);
  if (offset < pci::kCommand + 2 && offset + data.size() > pci::kCommand) {
    for (int i = 0; i < kPciBarCount; ++i) updateDecoding(*function, i);
  }
}

void PciRoot::refreshDecoding() {
  std::lock_guard lock(mutex_);
  for (auto& slot : slots_) {
    if (!slot) continue;
    for (int i = 0; i < kPciBarCount; ++i) updateDecoding(*slot, i);
  }
}

std::optional<uint64_t> PciRoot::barAddress(Bdf bdf, int index) const {
  if (index < 0 || index >= kPciBarCount) return std::nullopt;
  std::lock_guard lock(mutex_);
  const Function* function = find(bdf);
  if (function == nullptr) return std::nullopt;
  return function->bars[index].decoded;
}

uint32_t PciRoot::readBar(const Function& function, int index) {
  const BarState& state = function.bars[index];
  if (state.upperHalf) {
    const BarState& low = function.bars[index - 1];
    return static_cast<uint32_t>((low.address & sizeMask(low.bar)) >> 32);
  }
  const PciBar& bar = state.bar;
  switch (bar.type) {
    case PciBarType::kNone:
      return 0;
    case PciBarType::kIo:
      return (static_cast<uint32_t>(state.address) & lowAddressMask(bar)) | kBarIo;
    case PciBarType::kMmio32:
    case PciBarType::kMmio64: {
      uint32_t value = static_cast<uint32_t>(state.address) & lowAddressMask(bar);
      if (bar.type == PciBarType::kMmio64) value |= kBarMem64;
      if (bar.prefetchable) value |= kBarPrefetchable;
      return value;
    }
  }
  return 0;
}

void PciRoot::writeBar(Function& function, int index, uint32_t value) {
  BarState& state = function.bars[index];
  if (state.upperHalf) {
    BarState& low = function.bars[index - 1];
    uint64_t high = (static_cast<uint64_t>(value) << 32) & sizeMask(low.bar);
    low.address = (low.address & 0xffffffffull) | high;
    return;
  }
  if (state.bar.type == PciBarType::kNone) return;
  // Writing all-ones and reading back gives ~(size - 1) plus the type bits: the sizing
  // protocol falls out of masking the address bits.
  state.address = (state.address & ~0xffffffffull) | (value & lowAddressMask(state.bar));
}

uint16_t PciRoot::command(Function& function) {
  uint8_t bytes[2] = {};
  function.device->readConfig(pci::kCommand, bytes);
  return static_cast<uint16_t>(bytes[0] | bytes[1] << 8);
}

void PciRoot::updateDecoding(Function& function, int index) {
  BarState& state = function.bars[index];
  const PciBar& bar = state.bar;
  if (state.upperHalf || bar.type == PciBarType::kNone) return;
  uint16_t enable = bar.type == PciBarType::kIo ? pci::kCommandIo : pci::kCommandMemory;
  uint64_t address = state.address & sizeMask(bar);
  uint64_t limit = bar.type == PciBarType::kIo       ? 0x10000
                   : bar.type == PciBarType::kMmio32 ? (1ull << 32)
                                                     : 0;  // 0: the whole 64-bit space
  bool fits = address != 0 && address + bar.size > address &&
              (limit == 0 || address + bar.size <= limit);
  std::optional<uint64_t> decoded;
  if ((command(function) & enable) && fits) decoded = address;
  if (decoded == state.decoded) return;
  std::optional<uint64_t> old = state.decoded;
  state.decoded = decoded;
  function.device->barMoved(index, old, decoded);
}

void PciEcam::read(uint64_t offset, std::span<uint8_t> data) {
  if (offset >= layout::kEcamSize) {
    std::fill(data.begin(), data.end(), 0xff);
    return;
  }
  Bdf bdf{static_cast<uint8_t>(offset >> 20), static_cast<uint8_t>((offset >> 15) & 0x1f),
          static_cast<uint8_t>((offset >> 12) & 0x7)};
  root_->readConfig(bdf, static_cast<uint16_t>(offset & 0xfff), data);
}

void PciEcam::write(uint64_t offset, std::span<const uint8_t> data) {
  if (offset >= layout::kEcamSize) return;
  Bdf bdf{static_cast<uint8_t>(offset >> 20), static_cast<uint8_t>((offset >> 15) & 0x1f),
          static_cast<uint8_t>((offset >> 12) & 0x7)};
  root_->writeConfig(bdf, static_cast<uint16_t>(offset & 0xfff), data);
}

PciConfigIo::PciConfigIo(std::shared_ptr<PciRoot> root, std::shared_ptr<BusDevice> resetControl,
                         spdlog::logger& log)
    : root_(std::move(root)), resetControl_(std::move(resetControl)), log_(log) {}

namespace {
constexpr uint32_t kConfigEnable = 0x80000000u;
// Enable, extended register (AMD's "IO ECS", bits 27..24), bus, device, function,
// register; the reserved bits 30..28 and 1..0 read as 0.
constexpr uint32_t kConfigAddressMask = 0x8ffffffcu;
constexpr uint64_t kDataOffset = 4;
constexpr uint64_t kResetControlOffset = layout::kResetPort - layout::kPciConfigAddressPort;
}  // namespace

std::optional<std::pair<Bdf, uint16_t>> PciConfigIo::target(uint64_t offset) const {
  std::lock_guard lock(mutex_);
  if (!(address_ & kConfigEnable)) return std::nullopt;
  Bdf bdf{static_cast<uint8_t>(address_ >> 16), static_cast<uint8_t>((address_ >> 11) & 0x1f),
          static_cast<uint8_t>((address_ >> 8) & 0x7)};
  uint16_t reg = static_cast<uint16_t>(((address_ >> 16) & 0xf00) | (address_ & 0xfc));
  return std::pair{bdf, static_cast<uint16_t>(reg + (offset - kDataOffset))};
}

void PciConfigIo::read(uint64_t offset, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), 0xff);
  if (offset >= kDataOffset && offset + data.size() <= kPortCount) {
    if (auto where = target(offset)) root_->readConfig(where->first, where->second, data);
    return;
  }
  if (offset == 0 && data.size() == 4) {
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < 4; ++i) data[i] = static_cast<uint8_t>(address_ >> (8 * i));
    return;
  }
  if (offset == kResetControlOffset && data.size() == 1 && resetControl_) {
    resetControl_->read(0, data);
    return;
  }
  log_.debug("pci config io: {}-byte read at offset {:#x} ignored", data.size(), offset);
}

void PciConfigIo::write(uint64_t offset, std::span<const uint8_t> data) {
  if (offset >= kDataOffset && offset + data.size() <= kPortCount) {
    if (auto where = target(offset)) root_->writeConfig(where->first, where->second, data);
    return;
  }
  if (offset == 0 && data.size() == 4) {
    uint32_t value = data[0] | data[1] << 8 | data[2] << 16 | static_cast<uint32_t>(data[3]) << 24;
    std::lock_guard lock(mutex_);
    address_ = value & kConfigAddressMask;
    return;
  }
  if (offset == kResetControlOffset && data.size() == 1 && resetControl_) {
    resetControl_->write(0, data);
    return;
  }
  log_.debug("pci config io: {}-byte write at offset {:#x} ignored", data.size(), offset);
}

}  // namespace clonevm::vmm
