#include "cli/program_path.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "common/error.h"

namespace clonevm::cli {

std::string siblingProgram(const std::string& name) {
  std::filesystem::path dir;
  if (const char* env = std::getenv("CLONE_BIN_DIR"); env != nullptr && *env != '\0') {
    dir = env;
  } else {
    std::error_code error;
    auto self = std::filesystem::read_symlink("/proc/self/exe", error);
    require(!error, "cannot find this program's path (/proc/self/exe): {}", error.message());
    dir = self.parent_path();
  }
  auto path = dir / name;
  require(::access(path.c_str(), X_OK) == 0, "program {} not found or not executable",
          path.string());
  return path.string();
}

}  // namespace clonevm::cli
