#pragma once
// The host side of the serial console: a thread that reads the VMM's stdin and hands the
// bytes to the UART, and a terminal put in raw mode while the VM runs (when stdin is a tty).

#include <termios.h>

#include <atomic>
#include <functional>
#include <span>
#include <thread>

#include "common/unique_fd.h"

namespace clonevm::vmm {

class ConsoleInput {
 public:
  using Sink = std::function<void(std::span<const uint8_t>)>;

  // Reads `fd` (not owned) until EOF or stop(); every chunk goes to `sink`.
  ConsoleInput(int fd, Sink sink);
  ConsoleInput(const ConsoleInput&) = delete;
  ConsoleInput& operator=(const ConsoleInput&) = delete;
  ~ConsoleInput();

  void stop();

 private:
  void loop();

  int fd_;
  Sink sink_;
  UniqueFd wakeup_;  // eventfd that ends the poll loop
  std::thread thread_;
  bool rawTerminal_ = false;
  termios savedTerminal_{};
};

}  // namespace clonevm::vmm
