#pragma once
// The one error style of Clone: exceptions that carry their context.
//
// - clonevm::Error: a failed check or bad input. The message says what was wrong.
// - clonevm::SystemError: a failed syscall. The message names the step, the path
//   (when there is one) and errno's text: "open kernel image /x: No such file".
//
// Use CLONE_SYSCALL for syscalls (retries EINTR) and clonevm::require() for checks.

#include <cerrno>
#include <stdexcept>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace clonevm {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class SystemError : public Error {
 public:
  SystemError(int err, std::string_view step, std::string_view path = {});
  int code() const { return errno_; }

 private:
  int errno_;
};

[[noreturn]] void throwSystemError(int err, std::string_view step, std::string_view path = {});

// Throws clonevm::Error with a formatted message unless `condition` holds.
template <typename... Args>
inline void require(bool condition, fmt::format_string<Args...> format, Args&&... args) {
  if (!condition) [[unlikely]] {
    throw Error(fmt::format(format, std::forward<Args>(args)...));
  }
}

// Returns `rc` when non-negative, otherwise throws SystemError built from errno.
template <typename T>
inline T checkSyscall(T rc, std::string_view step, std::string_view path = {}) {
  if (rc < 0) [[unlikely]] {
    throwSystemError(errno, step, path);
  }
  return rc;
}

}  // namespace clonevm

// CLONE_SYSCALL(expr, step[, path]): runs expr, retrying on EINTR; throws SystemError on -1.
#define CLONE_SYSCALL(expr, ...)                        \
  ([&]() {                                              \
    for (;;) {                                          \
      auto _clone_rc = (expr);                          \
      if (_clone_rc < 0 && errno == EINTR) continue;    \
      return ::clonevm::checkSyscall(_clone_rc, __VA_ARGS__); \
    }                                                   \
  }())
