#include "common/error.h"

#include <cstring>

namespace clonevm {
namespace {

std::string describe(int err, std::string_view step, std::string_view path) {
  if (path.empty()) {
    return fmt::format("{}: {}", step, std::strerror(err));
  }
  return fmt::format("{} {}: {}", step, path, std::strerror(err));
}

}  // namespace

SystemError::SystemError(int err, std::string_view step, std::string_view path)
    : Error(describe(err, step, path)), errno_(err) {}

void throwSystemError(int err, std::string_view step, std::string_view path) {
  throw SystemError(err, step, path);
}

}  // namespace clonevm
