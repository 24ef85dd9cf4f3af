#pragma once
// Runs one process in its jail (docs/JAILER.md). The calling process stays as the jail's
// parent: it forwards termination signals, waits for the jailed process and removes its cgroup.

#include "jailer/jail_config.h"

namespace clonevm::jailer {

// Returns the jailed process's exit code, or 128 + signal if a signal ended it. Throws
// clonevm::Error (SystemError naming the step and path) if the jail cannot be built before the
// process starts; a failure inside the new process after the clone is reported on stderr as
// "clone-jailer: <step> <path>: <error>" and exit code 125.
int runJailed(const JailConfig& config);

// The exit code of a jail that failed in its setup, after the clone.
constexpr int kExitJailSetupFailed = 125;

}  // namespace clonevm::jailer
