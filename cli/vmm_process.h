#pragma once
// What the core process of a `clone run` VM needs from its jail.

#include <string>
#include <vector>

#include "cli/process_launcher.h"
#include "cli/run_command.h"

namespace clonevm::cli {

// The ProcessSpec of clone-vmm (`program`) for `options`: its files (made absolute, since the
// jailed process starts in /), the API socket's directory, the vhost-user sockets and /dev/kvm.
ProcessSpec vmmProcessSpec(const RunOptions& options, const std::vector<std::string>& globalArgs,
                           const std::string& program);

}  // namespace clonevm::cli
