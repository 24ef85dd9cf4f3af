#pragma once
// `clone snapshot|fork|list|destroy`: templates and forks (docs/FORK.md).

#include <chrono>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/agent_client.h"
#include "cli/app.h"

namespace clonevm::cli {

struct ForkCommandOptions {
  std::string socket;         // snapshot, destroy: --vm
  std::string output;         // snapshot: --output
  bool leavePaused = false;   // snapshot
  std::string templateDir;    // fork: --template
  unsigned count = 1;         // fork
  std::string apiSocket;      // fork: explicit socket (PATH, or PATH.N for N > 1 forks)
  bool noIdentity = false;    // fork: --no-identity (do not talk to the guest agent)
};

// Where forks' API sockets and console logs live: $CLONE_RUNTIME_DIR, else
// $XDG_RUNTIME_DIR/clone, else /tmp/clone-UID. Created on demand (0700).
std::string runtimeDir();

// The identity a fork gets (DESIGN §6): its id as hostname, a fresh 32-byte RNG seed from
// the host's getrandom(), the host's wall clock now.
Identity forkIdentity(const std::string& forkId);

// How far the guest's clock read back after IDENTITY may be from the host's.
inline constexpr std::chrono::milliseconds kGuestClockTolerance{2000};

// Checks what the guest read back after IDENTITY against what was sent; `hostNow` is the host's
// wall clock when the answer arrived. Returns one line per problem (none: applied as asked).
std::vector<std::string> identityProblems(const Identity& sent, const IdentityResult& result,
                                          std::chrono::system_clock::time_point hostNow,
                                          std::chrono::milliseconds clockTolerance = kGuestClockTolerance);

void addForkCommands(CLI::App& app, ForkCommandOptions& options, Streams streams);

}  // namespace clonevm::cli
