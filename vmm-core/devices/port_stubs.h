#pragma once
// Ports that exist on a PC but need no behaviour in a Clone VM.
//
// What Linux touches at boot, and who answers (the in-kernel devices never exit to us):
//   0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1  PIC and ELCR: KVM's in-kernel irqchip
//   0x40-0x43, 0x61                    PIT and port B: KVM_CREATE_PIT2 (KVM_PIT_SPEAKER_DUMMY)
//   0x60, 0x64                         I8042
//   0x70-0x71                          Cmos
//   0x80                               PostCodePort (below)
//   0x3f8-0x3ff                        Serial (COM1)
//   0xcf8-0xcff                        PciConfigIo, with 0xcf9 forwarded to ResetControl
//   0x600-0x60b                        AcpiPm
// Everything else is left unclaimed on purpose, and must read as all-ones (the vCPU loop's
// floating bus): Linux probes COM2-4 (0x2f8, 0x3e8, 0x2e8) and the ISA DMA controller
// (0x08) and concludes from 0xff that they are absent; a stub answering zeros would make
// it believe in hardware that is not there.
//
// Port 0x80 is written by outb_p()/io_delay(), e.g. around every CMOS and PIC access, unless
// the guest sees KVM_FEATURE_NOP_IO_DELAY in CPUID (then it never exits for it).

#include <atomic>
#include <cstdint>
#include <span>

#include <spdlog/logger.h>

#include "vmm-core/devices/bus.h"

namespace clonevm::vmm {

// Port 0x80 (layout::kPostCodePort): POST codes from firmware, delays from Linux. A byte
// written is kept (and logged at trace level); reads return it, like the DMA page register
// that shares the address on real chipsets.
class PostCodePort : public BusDevice {
 public:
  explicit PostCodePort(spdlog::logger& log) : log_(log) {}

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;
  uint8_t lastCode() const { return last_.load(std::memory_order_relaxed); }

 private:
  spdlog::logger& log_;
  std::atomic<uint8_t> last_{0};
};

// A range that answers without doing anything: reads return `readValue` in every byte,
// writes are dropped. For ports a guest is known to poke harmlessly, to keep them out of
// the unclaimed-access log.
class NullPorts : public BusDevice {
 public:
  explicit NullPorts(uint8_t readValue = 0xff) : readValue_(readValue) {}

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t, std::span<const uint8_t>) override {}

 private:
  uint8_t readValue_;
};

}  // namespace clonevm::vmm
