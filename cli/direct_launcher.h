#pragma once
// The plain launcher: posix_spawn of the program, no sandbox (clone run --no-jail, and until
// the jailed launcher is wired). keepFds are inherited; every other fd of ours is CLOEXEC.

#include "cli/process_launcher.h"

namespace clonevm::cli {

class DirectLauncher : public ProcessLauncher {
 public:
  pid_t launch(const ProcessSpec& spec) override;
};

}  // namespace clonevm::cli
