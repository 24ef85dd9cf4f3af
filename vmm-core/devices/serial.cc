#include "vmm-core/devices/serial.h"

#include <algorithm>
#include <exception>

namespace clonevm::vmm {
namespace {

// Register offsets.
constexpr uint8_t kRbrThrDll = 0;
constexpr uint8_t kIerDlm = 1;
constexpr uint8_t kIirFcr = 2;
constexpr uint8_t kLcr = 3;
constexpr uint8_t kMcr = 4;
constexpr uint8_t kLsr = 5;
constexpr uint8_t kMsr = 6;
constexpr uint8_t kScr = 7;

constexpr uint8_t kIerRdi = 0x01;   // received data available
constexpr uint8_t kIerThri = 0x02;  // THR empty
constexpr uint8_t kIerRlsi = 0x04;  // receiver line status
constexpr uint8_t kIerMsi = 0x08;   // modem status
constexpr uint8_t kIerMask = 0x0f;  // bits 7..4 are zero on a 16550A

constexpr uint8_t kIirNoInterrupt = 0x01;
constexpr uint8_t kIirModemStatus = 0x00;
constexpr uint8_t kIirThrEmpty = 0x02;
constexpr uint8_t kIirRxData = 0x04;
constexpr uint8_t kIirLineStatus = 0x06;
constexpr uint8_t kIirRxTimeout = 0x0c;
constexpr uint8_t kIirFifoEnabled = 0xc0;

constexpr uint8_t kFcrEnable = 0x01;
constexpr uint8_t kFcrClearRx = 0x02;
constexpr uint8_t kFcrKeptBits = 0xc9;  // enable, DMA mode, RX trigger level

constexpr uint8_t kLcrDlab = 0x80;

constexpr uint8_t kMcrDtr = 0x01;
constexpr uint8_t kMcrRts = 0x02;
constexpr uint8_t kMcrOut1 = 0x04;
constexpr uint8_t kMcrOut2 = 0x08;
constexpr uint8_t kMcrLoop = 0x10;
constexpr uint8_t kMcrMask = 0x1f;

constexpr uint8_t kLsrDr = 0x01;
constexpr uint8_t kLsrOe = 0x02;
constexpr uint8_t kLsrThre = 0x20;
constexpr uint8_t kLsrTemt = 0x40;

constexpr uint8_t kMsrDcts = 0x01;
constexpr uint8_t kMsrDdsr = 0x02;
constexpr uint8_t kMsrTeri = 0x04;
constexpr uint8_t kMsrDdcd = 0x08;
constexpr uint8_t kMsrCts = 0x10;
constexpr uint8_t kMsrDsr = 0x20;
constexpr uint8_t kMsrRi = 0x40;
constexpr uint8_t kMsrDcd = 0x80;

constexpr size_t kRxTriggerLevels[4] = {1, 4, 8, 14};

}  // namespace

Serial::Serial(IrqLine& irq, OutputSink output, spdlog::logger& log)
    : Serial(irq, std::move(output), log, Options{}) {}

Serial::Serial(IrqLine& irq, OutputSink output, spdlog::logger& log, Options options)
    : irq_(irq), output_(std::move(output)), log_(log), options_(options) {
  outBuffer_.reserve(std::max<size_t>(options_.outputBatch, 1));
}

Serial::~Serial() {
  std::lock_guard lock(mutex_);
  flushLocked();
}

void Serial::read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t reg = offset + i;
    if (reg >= kPortCount) {
      log_.debug("serial: read at bad offset {:#x}", reg);
      data[i] = 0xff;
      continue;
    }
    data[i] = readRegister(static_cast<uint8_t>(reg));
  }
  updateIrq();
}

void Serial::write(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t reg = offset + i;
    if (reg >= kPortCount) {
      log_.debug("serial: write at bad offset {:#x}", reg);
      continue;
    }
    writeRegister(static_cast<uint8_t>(reg), data[i]);
  }
  updateIrq();
}

size_t Serial::enqueueInput(std::span<const uint8_t> bytes) {
  std::lock_guard lock(mutex_);
  size_t room = options_.inputQueueLimit > hostQueue_.size()
                    ? options_.inputQueueLimit - hostQueue_.size()
                    : 0;
  size_t accepted = std::min(room, bytes.size());
  hostQueue_.insert(hostQueue_.end(), bytes.begin(), bytes.begin() + accepted);
  refillRxFifo();
  updateIrq();
  return accepted;
}

size_t Serial::pendingInput() const {
  std::lock_guard lock(mutex_);
  return rxFifo_.size() + hostQueue_.size();
}

void Serial::flush() {
  std::lock_guard lock(mutex_);
  flushLocked();
}

uint8_t Serial::readRegister(uint8_t reg) {
  noteAccess(reg == kLsr ? Access::kLsrRead : Access::kOther);
  bool dlab = (lcr_ & kLcrDlab) != 0;
  switch (reg) {
    case kRbrThrDll: {
      if (dlab) return dll_;
      if (rxFifo_.empty()) return 0;
      uint8_t value = rxFifo_.front();
      rxFifo_.pop_front();
      refillRxFifo();
      return value;
    }
    case kIerDlm:
      return dlab ? dlm_ : ier_;
    case kIirFcr: {
      uint8_t iir = interruptIdentification();
      // Reading IIR while it reports "THR empty" acknowledges that interrupt.
      if ((iir & 0x0f) == kIirThrEmpty) thrInterrupt_ = false;
      return iir;
    }
    case kLcr:
      return lcr_;
    case kMcr:
      return mcr_;
    case kLsr: {
      uint8_t lsr = lsrErrors_ | kLsrThre | kLsrTemt;
      if (!rxFifo_.empty()) lsr |= kLsrDr;
      lsrErrors_ = 0;
      return lsr;
    }
    case kMsr: {
      uint8_t msr = modemStatusLines() | msrDelta_;
      msrDelta_ = 0;
      return msr;
    }
    case kScr:
      return scr_;
  }
  return 0xff;
}

void Serial::writeRegister(uint8_t reg, uint8_t value) {
  bool dlab = (lcr_ & kLcrDlab) != 0;
  noteAccess(reg == kRbrThrDll && !dlab ? Access::kThrWrite : Access::kOther);
  switch (reg) {
    case kRbrThrDll:
      if (dlab) {
        dll_ = value;
      } else {
        transmit(value);
      }
      break;
    case kIerDlm:
      if (dlab) {
        dlm_ = value;
      } else {
        uint8_t old = ier_;
        ier_ = value & kIerMask;
        // Enabling the THRE interrupt while THR is empty (always, here) raises it anew:
        // Linux's 8250 startup checks for exactly this re-assertion.
        if ((ier_ & kIerThri) && !(old & kIerThri)) thrInterrupt_ = true;
      }
      break;
    case kIirFcr: {
      bool wasEnabled = (fcr_ & kFcrEnable) != 0;
      if (value & kFcrEnable) {
        if (!wasEnabled || (value & kFcrClearRx)) clearRxFifo();
        // FCR bit 2 (clear TX FIFO) has nothing to do: transmission is instantaneous.
        fcr_ = value & kFcrKeptBits;
      } else {
        if (wasEnabled) clearRxFifo();
        fcr_ = 0;
      }
      refillRxFifo();
      break;
    }
    case kLcr:
      lcr_ = value;
      break;
    case kMcr:
      setModemControl(value & kMcrMask);
      break;
    case kLsr:
    case kMsr:
      log_.debug("serial: write {:#04x} to read-only register {}", value, reg);
      break;
    case kScr:
      scr_ = value;
      break;
  }
}

void Serial::noteAccess(Access access) {
  switch (access) {
    case Access::kThrWrite:
      lastWasLsrRead_ = false;
      return;
    case Access::kLsrRead:
      // One LSR read between THR writes is the polled transmit loop: keep batching.
      // Two in a row mean the guest is waiting for something else: show what it wrote.
      if (lastWasLsrRead_) flushLocked();
      lastWasLsrRead_ = true;
      return;
    case Access::kOther:
      flushLocked();
      lastWasLsrRead_ = false;
      return;
  }
}

void Serial::transmit(uint8_t byte) {
  if (mcr_ & kMcrLoop) {
    if (rxFifo_.size() < rxFifoCapacity()) {
      rxFifo_.push_back(byte);
    } else {
      lsrErrors_ |= kLsrOe;
      // Without the FIFO the new character overwrites RBR; with it the FIFO keeps its data.
      if (!(fcr_ & kFcrEnable)) rxFifo_.back() = byte;
    }
  } else {
    outBuffer_.push_back(byte);
    if (byte == '\n' || outBuffer_.size() >= options_.outputBatch) flushLocked();
  }
  thrInterrupt_ = true;
}

void Serial::flushLocked() {
  if (outBuffer_.empty()) return;
  if (output_) {
    try {
      output_(outBuffer_);
    } catch (const std::exception& e) {
      log_.warn("serial: console output failed: {}", e.what());
    }
  }
  outBuffer_.clear();
}

void Serial::refillRxFifo() {
  if (mcr_ & kMcrLoop) return;  // the serial input is disconnected in loopback
  size_t capacity = rxFifoCapacity();
  while (rxFifo_.size() < capacity && !hostQueue_.empty()) {
    rxFifo_.push_back(hostQueue_.front());
    hostQueue_.pop_front();
  }
}

void Serial::clearRxFifo() { rxFifo_.clear(); }

size_t Serial::rxFifoCapacity() const { return (fcr_ & kFcrEnable) ? kFifoSize : 1; }

uint8_t Serial::modemStatusLines() const {
  if (!(mcr_ & kMcrLoop)) return kMsrDcd | kMsrDsr | kMsrCts;
  uint8_t lines = 0;
  if (mcr_ & kMcrRts) lines |= kMsrCts;
  if (mcr_ & kMcrDtr) lines |= kMsrDsr;
  if (mcr_ & kMcrOut1) lines |= kMsrRi;
  if (mcr_ & kMcrOut2) lines |= kMsrDcd;
  return lines;
}

void Serial::setModemControl(uint8_t mcr) {
  uint8_t before = modemStatusLines();
  bool wasLoop = (mcr_ & kMcrLoop) != 0;
  mcr_ = mcr;
  uint8_t after = modemStatusLines();
  uint8_t changed = before ^ after;
  if (changed & kMsrCts) msrDelta_ |= kMsrDcts;
  if (changed & kMsrDsr) msrDelta_ |= kMsrDdsr;
  if ((before & kMsrRi) && !(after & kMsrRi)) msrDelta_ |= kMsrTeri;  // trailing edge only
  if (changed & kMsrDcd) msrDelta_ |= kMsrDdcd;
  if (wasLoop && !(mcr_ & kMcrLoop)) refillRxFifo();
}

uint8_t Serial::interruptIdentification() const {
  bool fifo = (fcr_ & kFcrEnable) != 0;
  uint8_t high = fifo ? kIirFifoEnabled : 0;
  if ((ier_ & kIerRlsi) && lsrErrors_) return high | kIirLineStatus;
  if ((ier_ & kIerRdi) && !rxFifo_.empty()) {
    // Below the trigger level a real FIFO reports a character timeout once the line has
    // been idle for four character times; with no line timing, that is at once.
    if (fifo && rxFifo_.size() < kRxTriggerLevels[fcr_ >> 6]) return high | kIirRxTimeout;
    return high | kIirRxData;
  }
  if ((ier_ & kIerThri) && thrInterrupt_) return high | kIirThrEmpty;
  if ((ier_ & kIerMsi) && msrDelta_) return high | kIirModemStatus;
  return high | kIirNoInterrupt;
}

Serial::State Serial::saveState() const {
  std::lock_guard lock(mutex_);
  return State{ier_, lcr_, mcr_, lsrErrors_, msrDelta_, scr_, dll_, dlm_, fcr_, thrInterrupt_,
               lastWasLsrRead_, irqLevel_, std::vector<uint8_t>(rxFifo_.begin(), rxFifo_.end())};
}

void Serial::restoreState(const State& state) {
  std::lock_guard lock(mutex_);
  ier_ = state.ier;
  lcr_ = state.lcr;
  mcr_ = state.mcr;
  lsrErrors_ = state.lsrErrors;
  msrDelta_ = state.msrDelta;
  scr_ = state.scr;
  dll_ = state.dll;
  dlm_ = state.dlm;
  fcr_ = state.fcr;
  thrInterrupt_ = state.thrInterrupt;
  lastWasLsrRead_ = state.lastWasLsrRead;
  size_t keep = std::min(state.rxFifo.size(), kFifoSize);
  rxFifo_.assign(state.rxFifo.begin(), state.rxFifo.begin() + static_cast<ptrdiff_t>(keep));
  // The irqchip state (restored separately) holds the line's level; set ours to match and
  // let updateIrq() correct it if the registers disagree.
  irqLevel_ = state.irqLevel;
  irq_.set(irqLevel_);
  updateIrq();
}

void Serial::updateIrq() {
  bool level = (interruptIdentification() & kIirNoInterrupt) == 0;
  if (level == irqLevel_) return;
  irqLevel_ = level;
  irq_.set(level);
}

}  // namespace clonevm::vmm
