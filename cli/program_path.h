#pragma once

#include <string>

namespace clonevm::cli {

// The path of Clone's program `name` ("clone-vmm", ...): $CLONE_BIN_DIR/name when set, else
// the directory this executable lives in.
std::string siblingProgram(const std::string& name);

}  // namespace clonevm::cli
