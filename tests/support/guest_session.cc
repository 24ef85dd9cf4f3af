#include "tests/support/guest_session.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <thread>

#include <fmt/format.h>

#include "common/error.h"

namespace clonevm::e2e {
namespace {

// $name when set (to test another build), else the build this test belongs to.
std::string envOr(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : fallback;
}

// Test output goes to a pipe (ctest), so stdout would be block-buffered, and a test that
// ctest kills at its timeout would lose every line it printed, its failures included.
[[maybe_unused]] const bool kStdoutLineBuffered = [] {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  return true;
}();

// What each thread of `pid` is doing in the kernel (root can read the stacks), for a process
// that outlived its SIGKILL.
std::string threadStates(pid_t pid) {
  std::string states;
  std::error_code error;
  for (const auto& task : std::filesystem::directory_iterator(fmt::format("/proc/{}/task", pid), error)) {
    auto read = [&](const char* name) {
      std::ifstream in(task.path() / name);
      return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    };
    states += fmt::format("  thread {} {}: {}{}", task.path().filename().string(), read("comm").substr(0, 15),
                          read("wchan"), "\n" + read("stack"));
  }
  return states;
}

}  // namespace

std::string buildBin(const std::string& program) {
  return envOr("CLONE_BUILD_DIR", CLONE_DEFAULT_BUILD_DIR) + "/bin/" + program;
}
std::string freshScratchDir(const std::string& relative) {
  std::filesystem::path dir = std::filesystem::path(envOr("CLONE_BUILD_DIR", CLONE_DEFAULT_BUILD_DIR)) / relative;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}
std::string guestKernel() { return envOr("CLONE_GUEST_DIR", CLONE_DEFAULT_GUEST_DIR) + "/vmlinuz"; }
std::string guestInitrd() { return envOr("CLONE_GUEST_DIR", CLONE_DEFAULT_GUEST_DIR) + "/initrd.img"; }

GuestSession::GuestSession(const std::string& program, const std::vector<std::string>& args) {
  int in[2];
  int out[2];
  CLONE_SYSCALL(::pipe2(in, O_CLOEXEC), "pipe for guest input");
  CLONE_SYSCALL(::pipe2(out, O_CLOEXEC), "pipe for guest output");
  pid_ = CLONE_SYSCALL(::fork(), "fork", program);
  if (pid_ == 0) {
    ::dup2(in[0], 0);
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    std::vector<char*> argv{const_cast<char*>(program.c_str())};
    for (const auto& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
    argv.push_back(nullptr);
    ::execv(program.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  input_ = UniqueFd(in[1]);
  outputFd_ = UniqueFd(out[0]);
  ::signal(SIGPIPE, SIG_IGN);
}

GuestSession::~GuestSession() {
  if (pid_ <= 0 || exitCode_) return;
  ::kill(pid_, SIGKILL);
  // Bounded: a process stuck in the kernel would otherwise hold the test until ctest's
  // timeout kills it with nothing said (CI-39's BootTest.GuestCountsTwoVcpus).
  for (int i = 0; i < 300; ++i) {
    if (::waitpid(pid_, nullptr, WNOHANG) != 0) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::cerr << fmt::format("GuestSession: pid {} did not end within 30 s of SIGKILL; left behind. Its threads:\n{}",
                           pid_, threadStates(pid_));
}

bool GuestSession::pump(std::chrono::milliseconds timeout) {
  if (!outputFd_.valid()) return false;
  pollfd fd{outputFd_.get(), POLLIN, 0};
  int ready = ::poll(&fd, 1, static_cast<int>(timeout.count()));
  if (ready <= 0) return true;
  char buffer[4096];
  ssize_t n = ::read(outputFd_.get(), buffer, sizeof(buffer));
  if (n <= 0) {
    outputFd_.reset();
    // The output ended: the process is gone or going. Say how in the output, so a failure
    // message shows a fork killed by a signal (SIGSYS: its seccomp policy) as such.
    reapWithin(std::chrono::seconds(1));
    return false;
  }
  output_.append(buffer, static_cast<size_t>(n));
  return true;
}

std::optional<std::string> GuestSession::readUntil(const std::string& text,
                                                   std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    size_t found = output_.find(text, position_);
    if (found != std::string::npos) {
      std::string before = output_.substr(position_, found - position_);
      position_ = found + text.size();
      return before;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::nullopt;
    if (!pump(std::min(left, std::chrono::milliseconds(200)))) {
      // EOF: one last look at what arrived.
      found = output_.find(text, position_);
      if (found == std::string::npos) return std::nullopt;
    }
  }
}

bool GuestSession::expect(const std::string& text, std::chrono::milliseconds timeout) {
  return readUntil(text, timeout).has_value();
}

void GuestSession::sendLine(const std::string& line) {
  std::string data = line + "\n";
  const char* p = data.data();
  size_t left = data.size();
  while (left > 0) {
    ssize_t n = ::write(input_.get(), p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int error = errno;
      reapWithin(std::chrono::seconds(1));
      drainAvailable();
      size_t tail = output_.size() > 3000 ? output_.size() - 3000 : 0;
      throw Error(fmt::format("writing to the guest console failed: {}; {}; its last output:\n{}",
                              std::strerror(error),
                              exitCode_ ? fmt::format("exit status {}", *exitCode_)
                                        : std::string("it has not exited"),
                              output_.substr(tail)));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
}

std::optional<std::string> GuestSession::run(const std::string& command,
                                             std::chrono::milliseconds timeout) {
  // The markers are built by the shell, so the typed command line (if echoed) never matches.
  int id = ++commandCounter_;
  sendLine(fmt::format("echo CMD-BEGIN-$(({}+0)).; {}; echo CMD-END-$(({}+0)).", id, command, id));
  if (!expect(fmt::format("CMD-BEGIN-{}.", id), timeout)) return std::nullopt;
  auto text = readUntil(fmt::format("CMD-END-{}.", id), timeout);
  if (!text) return std::nullopt;
  // The VMM logs to the same pipe, a whole line per write, and such a line can land inside
  // the command's output (even in the middle of one of its lines): it is not the command's.
  static const std::regex kVmmLogLine(
      R"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} [a-z]+ +[a-z-]+\[\d+\]: [^\n]*\n)");
  *text = std::regex_replace(*text, kVmmLogLine, "");
  // Drop the line breaks around the output (the guest's tty may add \r).
  size_t first = text->find_first_not_of("\r\n");
  size_t last = text->find_last_not_of("\r\n");
  return first == std::string::npos ? std::string() : text->substr(first, last - first + 1);
}

void GuestSession::closeInput() { input_.reset(); }

bool GuestSession::reap(int options) {
  if (exitCode_) return true;
  int status = 0;
  if (::waitpid(pid_, &status, options) != pid_) return false;
  if (WIFEXITED(status)) {
    exitCode_ = WEXITSTATUS(status);  // (not noted: callers parse the output of clean exits)
  } else {
    exitCode_ = 128 + WTERMSIG(status);
    output_ += fmt::format("\n[the process was killed by signal {} ({}){}]\n", WTERMSIG(status),
                           ::strsignal(WTERMSIG(status)),
                           WTERMSIG(status) == SIGSYS ? ": a syscall outside its seccomp policy" : "");
  }
  return true;
}

void GuestSession::reapWithin(std::chrono::milliseconds timeout) {
  for (auto deadline = std::chrono::steady_clock::now() + timeout;
       !reap(WNOHANG) && std::chrono::steady_clock::now() < deadline;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void GuestSession::drainAvailable() {
  while (pump(std::chrono::milliseconds(0)) && outputFd_.valid()) {
    pollfd fd{outputFd_.get(), POLLIN, 0};
    if (::poll(&fd, 1, 0) <= 0) break;
  }
}

std::optional<int> GuestSession::waitExit(std::chrono::milliseconds timeout) {
  if (exitCode_) return exitCode_;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (reap(WNOHANG)) {
      drainAvailable();
      return exitCode_;
    }
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    pump(std::chrono::milliseconds(20));
  }
}

}  // namespace clonevm::e2e
