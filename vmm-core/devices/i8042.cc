#include "vmm-core/devices/i8042.h"

namespace clonevm::vmm {
namespace {

constexpr uint8_t kStatusOutputFull = 0x01;
constexpr uint8_t kStatusSystemFlag = 0x04;
constexpr uint8_t kStatusCommand = 0x08;  // last write went to the command port
constexpr uint8_t kStatusUnlocked = 0x10;  // keyboard not inhibited by the key lock
constexpr uint8_t kStatusAuxData = 0x20;
constexpr uint8_t kStatusTimeout = 0x40;

// Command byte (CTR) bits.
constexpr uint8_t kCtrKeyboardInterrupt = 0x01;
constexpr uint8_t kCtrAuxInterrupt = 0x02;
constexpr uint8_t kCtrSystemFlag = 0x04;
constexpr uint8_t kCtrKeyboardDisabled = 0x10;
constexpr uint8_t kCtrAuxDisabled = 0x20;
constexpr uint8_t kCtrTranslate = 0x40;

// Output port bits.
constexpr uint8_t kOutputPortReset = 0x01;  // active low
constexpr uint8_t kOutputPortKeyboardFull = 0x10;
constexpr uint8_t kOutputPortAuxFull = 0x20;

constexpr uint8_t kAbsentDeviceReply = 0xfe;
constexpr size_t kQueueLimit = 16;

}  // namespace

I8042::I8042(IrqLine& keyboardIrq, IrqLine& auxIrq, std::function<void()> onReset,
             spdlog::logger& log)
    : keyboardIrq_(keyboardIrq), auxIrq_(auxIrq), onReset_(std::move(onReset)), log_(log) {
  // What firmware leaves behind: translation on, keyboard interrupt on, aux disabled.
  commandByte() = kCtrTranslate | kCtrAuxDisabled | kCtrSystemFlag | kCtrKeyboardInterrupt;
}

void I8042::read(uint64_t offset, std::span<uint8_t> data) {
  if (data.size() != 1 || (offset != kDataOffset && offset != kCommandOffset)) {
    log_.debug("i8042: {}-byte read at offset {:#x}", data.size(), offset);
    for (auto& byte : data) byte = 0xff;
    return;
  }
  std::lock_guard lock(mutex_);
  data[0] = offset == kDataOffset ? readData() : readStatus();
}

void I8042::write(uint64_t offset, std::span<const uint8_t> data) {
  if (data.size() != 1 || (offset != kDataOffset && offset != kCommandOffset)) {
    log_.debug("i8042: {}-byte write at offset {:#x}", data.size(), offset);
    return;
  }
  bool reset = false;
  {
    std::lock_guard lock(mutex_);
    reset = offset == kDataOffset ? writeData(data[0]) : writeCommand(data[0]);
    updateIrqs(false);
  }
  if (reset) {
    log_.info("i8042: guest pulsed the reset line");
    if (onReset_) onReset_();
  }
}

uint8_t I8042::readData() {
  if (!outputBuffer_) return lastOutput_;  // an empty buffer reads the last byte again
  lastOutput_ = outputBuffer_->value;
  outputBuffer_.reset();
  loadOutputBuffer();
  updateIrqs(true);
  return lastOutput_;
}

uint8_t I8042::readStatus() const {
  uint8_t status = kStatusUnlocked;
  if (commandByte() & kCtrSystemFlag) status |= kStatusSystemFlag;
  if (lastWriteWasCommand_) status |= kStatusCommand;
  if (outputBuffer_) {
    status |= kStatusOutputFull;
    if (outputBuffer_->aux) status |= kStatusAuxData;
    if (outputBuffer_->timeout) status |= kStatusTimeout;
  }
  return status;
}

bool I8042::writeData(uint8_t value) {
  lastWriteWasCommand_ = false;
  if (!pendingCommand_) {
    // To the keyboard, which is not there.
    queue(kAbsentDeviceReply, false, true);
    return false;
  }
  uint8_t command = *pendingCommand_;
  pendingCommand_.reset();
  if (command >= 0x60 && command <= 0x7f) {
    ram_[command & 0x1f] = value;
    return false;
  }
  switch (command) {
    case 0xd1:  // write output port
      // Bit 0 low asserts the CPU reset; it reads back high (the VMM does the reset).
      outputPort_ = value | kOutputPortReset;
      return (value & kOutputPortReset) == 0;
    case 0xd2:  // write keyboard output buffer
      queue(value, false);
      return false;
    case 0xd3:  // write aux output buffer (loopback)
      queue(value, true);
      return false;
    case 0xd4:  // write to the aux device, which is not there
      queue(kAbsentDeviceReply, true, true);
      return false;
  }
  return false;
}

bool I8042::writeCommand(uint8_t command) {
  lastWriteWasCommand_ = true;
  pendingCommand_.reset();
  if (command >= 0x20 && command <= 0x3f) {
    queue(ram_[command & 0x1f]);
    return false;
  }
  if ((command >= 0x60 && command <= 0x7f) || (command >= 0xd1 && command <= 0xd4)) {
    pendingCommand_ = command;
    return false;
  }
  if (command >= 0xf0) {
    // Pulse the output lines whose bits are 0; line 0 is the CPU reset.
    return (command & kOutputPortReset) == 0;
  }
  switch (command) {
    case 0xa7:
      commandByte() |= kCtrAuxDisabled;
      break;
    case 0xa8:
      commandByte() &= ~kCtrAuxDisabled;
      break;
    case 0xa9:  // aux interface test: no error
    case 0xab:  // keyboard interface test: no error
      queue(0x00);
      break;
    case 0xaa:  // controller self-test
      commandByte() |= kCtrSystemFlag;
      queue(0x55);
      break;
    case 0xad:
      commandByte() |= kCtrKeyboardDisabled;
      break;
    case 0xae:
      commandByte() &= ~kCtrKeyboardDisabled;
      break;
    case 0xc0:  // input port: keyboard not inhibited
      queue(0x80);
      break;
    case 0xd0: {
      uint8_t port = outputPort_ & ~(kOutputPortKeyboardFull | kOutputPortAuxFull);
      if (keyboardLevel_) port |= kOutputPortKeyboardFull;
      if (auxLevel_) port |= kOutputPortAuxFull;
      queue(port);
      break;
    }
    default:
      log_.debug("i8042: unknown controller command {:#04x}", command);
      break;
  }
  return false;
}

void I8042::queue(uint8_t value, bool aux, bool timeout) {
  if (queue_.size() >= kQueueLimit) {
    log_.debug("i8042: output queue full, dropping {:#04x}", value);
    return;
  }
  queue_.push_back(OutputByte{value, aux, timeout});
  loadOutputBuffer();
}

void I8042::loadOutputBuffer() {
  if (outputBuffer_ || queue_.empty()) return;
  outputBuffer_ = queue_.front();
  queue_.pop_front();
}

I8042::State I8042::saveState() {
  std::lock_guard lock(mutex_);
  auto pack = [](const OutputByte& b) {
    return static_cast<uint16_t>(b.value | (b.aux ? 0x100 : 0) | (b.timeout ? 0x200 : 0));
  };
  State state{};
  std::copy(std::begin(ram_), std::end(ram_), state.ram.begin());
  state.outputPort = outputPort_;
  state.lastOutput = lastOutput_;
  state.lastWriteWasCommand = lastWriteWasCommand_;
  state.pendingCommand = pendingCommand_ ? *pendingCommand_ : -1;
  state.outputBuffer = outputBuffer_ ? pack(*outputBuffer_) : -1;
  for (const auto& b : queue_) state.queue.push_back(pack(b));
  return state;
}

void I8042::restoreState(const State& state) {
  std::lock_guard lock(mutex_);
  auto unpack = [](uint32_t v) {
    return OutputByte{static_cast<uint8_t>(v & 0xff), (v & 0x100) != 0, (v & 0x200) != 0};
  };
  std::copy(state.ram.begin(), state.ram.end(), std::begin(ram_));
  outputPort_ = state.outputPort;
  lastOutput_ = state.lastOutput;
  lastWriteWasCommand_ = state.lastWriteWasCommand;
  pendingCommand_.reset();
  if (state.pendingCommand >= 0) pendingCommand_ = static_cast<uint8_t>(state.pendingCommand);
  outputBuffer_.reset();
  if (state.outputBuffer >= 0) outputBuffer_ = unpack(static_cast<uint32_t>(state.outputBuffer));
  queue_.clear();
  for (size_t i = 0; i < state.queue.size() && i < 64; ++i) queue_.push_back(unpack(state.queue[i]));
  updateIrqs(false);
}

void I8042::updateIrqs(bool pulse) {
  bool keyboard = outputBuffer_ && !outputBuffer_->aux && (commandByte() & kCtrKeyboardInterrupt);
  bool aux = outputBuffer_ && outputBuffer_->aux && (commandByte() & kCtrAuxInterrupt);
  // After the guest took a byte and the next one moved in, lower and raise the line again:
  // the IOAPIC/PIC inputs for ISA IRQs are edge-triggered.
  if (pulse && keyboard && keyboardLevel_) {
    keyboardIrq_.set(false);
    keyboardLevel_ = false;
  }
  if (pulse && aux && auxLevel_) {
    auxIrq_.set(false);
    auxLevel_ = false;
  }
  if (keyboard != keyboardLevel_) {
    keyboardLevel_ = keyboard;
    keyboardIrq_.set(keyboard);
  }
  if (aux != auxLevel_) {
    auxLevel_ = aux;
    auxIrq_.set(aux);
  }
}

}  // namespace clonevm::vmm
