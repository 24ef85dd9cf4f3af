#pragma once
// An i8042 keyboard controller with nothing plugged into its keyboard and mouse ports.
//
// It is there so that Linux's i8042 and atkbd/psmouse drivers probe quickly and quietly,
// and so that the classic reset path (command 0xFE, or clearing bit 0 of the output port
// with command 0xD1) reaches the VMM. Map it twice:
//   pio.insert(layout::kI8042DataPort, 1, kbc);                       // data, offset 0
//   pio.insert(layout::kI8042CommandPort, 1, kbc, I8042::kCommandOffset);  // status/command
//
// Controller commands: 0x20-0x3F read internal RAM (0x20: the command byte, "CTR"),
// 0x60-0x7F write it, 0xA7/0xA8 disable/enable the aux port, 0xA9 aux interface test (0x00),
// 0xAA self-test (0x55), 0xAB keyboard interface test (0x00), 0xAD/0xAE disable/enable the
// keyboard, 0xC0 read input port, 0xD0/0xD1 read/write output port, 0xD2/0xD3 write the
// keyboard/aux output buffer (the loopback Linux uses to test the aux port and its IRQ),
// 0xD4 write to the aux device, 0xF0-0xFF pulse output lines (0xFE pulses reset).
// Bytes sent to the absent keyboard or mouse are answered with 0xFE and the status
// register's timeout bit, so PS/2 drivers fail their probes at once instead of waiting.
//
// Interrupts: the keyboard line (layout::kI8042KeyboardIrq, 1) is raised while the output
// buffer holds a keyboard or controller byte and the command byte enables keyboard
// interrupts; the aux line (layout::kI8042AuxIrq, 12) likewise for aux bytes. The line is
// dropped and raised again for each queued byte, so an edge-triggered input sees one edge
// per byte.

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <array>
#include <vector>
#include <span>

#include <spdlog/logger.h>

#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/irq.h"

namespace clonevm::vmm {

class I8042 : public BusDevice {
 public:
  static constexpr uint64_t kDataOffset = 0;     // port 0x60
  static constexpr uint64_t kCommandOffset = 4;  // port 0x64

  // `onReset` runs on the vCPU thread that pulsed the reset line, without the device lock.
  I8042(IrqLine& keyboardIrq, IrqLine& auxIrq, std::function<void()> onReset,
        spdlog::logger& log);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // For snapshots. Output bytes are packed as value | aux << 8 | timeout << 9; -1 is none.
  struct State {
    std::array<uint8_t, 32> ram;
    uint8_t outputPort, lastOutput;
    bool lastWriteWasCommand;
    int16_t pendingCommand;
    int32_t outputBuffer;
    std::vector<uint16_t> queue;
  };
  State saveState();
  void restoreState(const State& state);

 private:
  struct OutputByte {
    uint8_t value;
    bool aux;
    bool timeout;
  };

  uint8_t readData();
  uint8_t readStatus() const;
  // Return true when the reset line was pulsed.
  bool writeData(uint8_t value);
  bool writeCommand(uint8_t command);
  void queue(uint8_t value, bool aux = false, bool timeout = false);
  void loadOutputBuffer();
  void updateIrqs(bool pulse);
  uint8_t& commandByte() { return ram_[0]; }
  uint8_t commandByte() const { return ram_[0]; }

  IrqLine& keyboardIrq_;
  IrqLine& auxIrq_;
  std::function<void()> onReset_;
  spdlog::logger& log_;

  std::mutex mutex_;
  uint8_t ram_[32] = {};          // ram_[0] is the command byte
  uint8_t outputPort_ = 0x03;     // bit 0: reset line high (running), bit 1: A20 enabled
  bool lastWriteWasCommand_ = false;
  std::optional<uint8_t> pendingCommand_;  // a command waiting for its data byte
  std::optional<OutputByte> outputBuffer_;
  uint8_t lastOutput_ = 0;
  std::deque<OutputByte> queue_;
  bool keyboardLevel_ = false;
  bool auxLevel_ = false;
};

}  // namespace clonevm::vmm
