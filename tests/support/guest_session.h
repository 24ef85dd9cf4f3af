#pragma once
// Drives a VM started by `clone run` the way a person at its serial console would: wait for
// text, type a line, wait for the process to end. Every wait has a deadline, so a hung guest
// fails the test instead of hanging it.

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "common/unique_fd.h"

namespace clonevm::e2e {

using namespace std::chrono_literals;

// Paths of the build's programs and guest images (from the environment ctest sets, see
// tests/e2e/CMakeLists.txt).
std::string buildBin(const std::string& program);
// BUILD/relative, emptied (removed and created again): a test's scratch directory.
std::string freshScratchDir(const std::string& relative);
std::string guestKernel();
std::string guestInitrd();

class GuestSession {
 public:
  // Starts `program args...` with stdin and stdout+stderr on pipes.
  GuestSession(const std::string& program, const std::vector<std::string>& args);
  ~GuestSession();
  GuestSession(const GuestSession&) = delete;
  GuestSession& operator=(const GuestSession&) = delete;

  // Waits until `text` appears in the output after the current read position and moves the
  // position past it. Returns false on timeout or when the process exits first.
  bool expect(const std::string& text, std::chrono::milliseconds timeout = 120s);
  // Like expect(), returning the output between the old position and the match.
  std::optional<std::string> readUntil(const std::string& text,
                                       std::chrono::milliseconds timeout = 60s);
  // Types `line` and a newline.
  void sendLine(const std::string& line);
  // Runs `command` in the guest shell and returns its output (framed by unique markers).
  std::optional<std::string> run(const std::string& command,
                                 std::chrono::milliseconds timeout = 60s);
  void closeInput();
  // Waits for the process to end; returns its exit code (128+signal), or nullopt on timeout.
  std::optional<int> waitExit(std::chrono::milliseconds timeout = 30s);
  // All output so far (for failure messages).
  const std::string& output() const { return output_; }
  pid_t pid() const { return pid_; }
  // Reads whatever output is ready now, without waiting (a process that writes much and is
  // seldom read would otherwise fill its pipe and stall).
  void drainAvailable();

 private:
  // Reads what is available, waiting up to `timeout`; false at EOF.
  bool pump(std::chrono::milliseconds timeout);
  // Collects the process's exit status if it has one (waitpid `options`), noting it in the
  // output. True once it is collected.
  bool reap(int options);
  // reap() until the process is collected or `timeout` has passed.
  void reapWithin(std::chrono::milliseconds timeout);

  pid_t pid_ = -1;
  std::optional<int> exitCode_;
  UniqueFd input_;
  UniqueFd outputFd_;
  std::string output_;
  size_t position_ = 0;
  int commandCounter_ = 0;
};

}  // namespace clonevm::e2e
