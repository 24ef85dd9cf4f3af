#pragma once
// A 16550A UART (COM1: layout::kCom1Port, 8 ports, IRQ layout::kCom1Irq).
//
// Register set as in the National Semiconductor PC16550D datasheet: RBR/THR, IER, IIR/FCR,
// LCR (with DLAB), MCR (with loopback), LSR, MSR, SCR and the divisor latch. It passes
// Linux's 8250 autoconfig as a 16550A (IER probe, loopback MSR probe, FIFO bits in IIR,
// 16-byte FIFO counted in loopback) and its THRE re-assertion test.
//
// Transmission is instantaneous: a byte written to THR goes to the output sink (THR and the
// transmitter are empty again at once, so LSR.THRE and LSR.TEMT always read 1). Bytes are
// batched across consecutive THR writes and handed to the sink on a newline, when the
// batch is full, on any other register access except a single LSR poll, on flush() and on
// destruction; the sink is called with the device lock held, so output keeps its order.
//
// Reception: enqueueInput() (any thread, e.g. the host stdin thread) appends to a host-side
// queue; the device moves bytes from it into its 16-byte RX FIFO (1 byte with the FIFO
// disabled) as the guest reads RBR, so input is never overrun, only delayed. In loopback
// mode the host queue waits and THR feeds the RX FIFO (which can overrun, setting LSR.OE).
//
// The interrupt output is a level computed from IER and the pending conditions after every
// register access and every enqueue; IrqLine::set() is called when that level changes.
// Modem inputs outside loopback read as DCD, DSR and CTS asserted, RI not. MCR.OUT2 does
// not gate the interrupt line (as in QEMU and kvmtool).

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <span>
#include <vector>

#include <spdlog/logger.h>

#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/irq.h"

namespace clonevm::vmm {

class Serial : public BusDevice {
 public:
  // Receives the bytes the guest transmits. Called from vCPU threads with the UART locked:
  // it may block (back-pressure on the guest) but must not call back into this Serial.
  using OutputSink = std::function<void(std::span<const uint8_t>)>;

  struct Options {
    size_t outputBatch = 64;             // bytes buffered before the sink is called; >= 1
    size_t inputQueueLimit = 64 * 1024;  // host-side bytes waiting for the guest
  };

  static constexpr uint64_t kPortCount = 8;
  static constexpr size_t kFifoSize = 16;

  Serial(IrqLine& irq, OutputSink output, spdlog::logger& log);
  Serial(IrqLine& irq, OutputSink output, spdlog::logger& log, Options options);
  ~Serial() override;
  Serial(const Serial&) = delete;
  Serial& operator=(const Serial&) = delete;

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // Queues host input for the guest; thread-safe. Returns how many bytes were accepted:
  // fewer than bytes.size() only when the host-side queue is at Options::inputQueueLimit
  // (the caller may retry later; nothing accepted is ever dropped).
  size_t enqueueInput(std::span<const uint8_t> bytes);
  // Bytes accepted by enqueueInput() that the guest has not read yet (FIFO included).
  size_t pendingInput() const;
  // Hands any batched output to the sink now.
  void flush();

  // The guest-visible registers and receive FIFO, for snapshots. Host input not yet in the
  // FIFO is not part of it (it belongs to the host side of this process, not to the chip).
  struct State {
    uint8_t ier, lcr, mcr, lsrErrors, msrDelta, scr, dll, dlm, fcr;
    bool thrInterrupt, lastWasLsrRead, irqLevel;
    std::vector<uint8_t> rxFifo;
  };
  State saveState() const;
  // Loads `state` and drives the interrupt line to match it.
  void restoreState(const State& state);

 private:
  enum class Access { kThrWrite, kLsrRead, kOther };

  uint8_t readRegister(uint8_t reg);
  void writeRegister(uint8_t reg, uint8_t value);
  void noteAccess(Access access);
  void transmit(uint8_t byte);
  void flushLocked();
  void refillRxFifo();
  void clearRxFifo();
  size_t rxFifoCapacity() const;
  uint8_t modemStatusLines() const;  // MSR bits 7..4 as currently driven
  void setModemControl(uint8_t mcr);
  uint8_t interruptIdentification() const;
  void updateIrq();

  IrqLine& irq_;
  OutputSink output_;
  spdlog::logger& log_;
  const Options options_;

  mutable std::mutex mutex_;
  uint8_t ier_ = 0;
  uint8_t lcr_ = 0;
  uint8_t mcr_ = 0x08;  // OUT2, as QEMU and kvmtool reset it
  uint8_t lsrErrors_ = 0;  // OE/PE/FE/BI, cleared by reading LSR
  uint8_t msrDelta_ = 0;   // MSR bits 3..0, cleared by reading MSR
  uint8_t scr_ = 0;
  uint8_t dll_ = 0x0c;     // 9600 baud with the PC's 1.8432 MHz clock
  uint8_t dlm_ = 0;
  uint8_t fcr_ = 0;        // FIFO enable (bit 0), DMA mode (bit 3), RX trigger (bits 7..6)
  bool thrInterrupt_ = false;  // "THR empty" interrupt pending
  bool lastWasLsrRead_ = false;
  bool irqLevel_ = false;
  std::deque<uint8_t> rxFifo_;     // what the chip holds
  std::deque<uint8_t> hostQueue_;  // accepted input not yet in the FIFO
  std::vector<uint8_t> outBuffer_;
};

}  // namespace clonevm::vmm
