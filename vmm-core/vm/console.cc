#include "vmm-core/vm/console.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/error.h"

namespace clonevm::vmm {

ConsoleInput::ConsoleInput(int fd, Sink sink)
    : fd_(fd),
      sink_(std::move(sink)),
      wakeup_(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC), "eventfd console wakeup")) {
  if (::isatty(fd_) && ::tcgetattr(fd_, &savedTerminal_) == 0) {
    // Raw mode: keystrokes (Ctrl-C included) go to the guest, the guest echoes.
    termios raw = savedTerminal_;
    ::cfmakeraw(&raw);
    raw.c_oflag |= OPOST | ONLCR;  // keep our own log lines readable
    rawTerminal_ = ::tcsetattr(fd_, TCSANOW, &raw) == 0;
  }
  thread_ = std::thread([this] { loop(); });
}

ConsoleInput::~ConsoleInput() { stop(); }

void ConsoleInput::stop() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    (void)!::write(wakeup_.get(), &one, sizeof(one));
    thread_.join();
  }
  if (rawTerminal_) {
    ::tcsetattr(fd_, TCSANOW, &savedTerminal_);
    rawTerminal_ = false;
  }
}

void ConsoleInput::loop() {
  uint8_t buffer[4096];
  for (;;) {
    pollfd fds[2] = {{fd_, POLLIN, 0}, {wakeup_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    if (fds[0].revents == 0) continue;
    ssize_t n = ::read(fd_, buffer, sizeof(buffer));
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) return;  // EOF: the guest keeps running without input
    sink_(std::span<const uint8_t>(buffer, static_cast<size_t>(n)));
  }
}

}  // namespace clonevm::vmm
