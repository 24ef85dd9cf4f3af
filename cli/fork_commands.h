#pragma once
// `clone snapshot|fork|list|destroy`: templates and forks (docs/FORK.md).

#include <CLI/CLI.hpp>

#include "cli/app.h"

namespace clonevm::cli {

struct ForkCommandOptions {
  std::string socket;         // snapshot, destroy: --vm
  std::string output;         // snapshot: --output
  bool leavePaused = false;   // snapshot
  std::string templateDir;    // fork: --template
  unsigned count = 1;         // fork
  std::string apiSocket;      // fork: explicit socket (PATH, or PATH.N for N > 1 forks)
};

// Where forks' API sockets and console logs live: $CLONE_RUNTIME_DIR, else
// $XDG_RUNTIME_DIR/clone, else /tmp/clone-UID. Created on demand (0700).
std::string runtimeDir();

void addForkCommands(CLI::App& app, ForkCommandOptions& options, Streams streams);

}  // namespace clonevm::cli
