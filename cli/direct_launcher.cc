#include "cli/direct_launcher.h"

#include <spawn.h>

#include "common/error.h"

extern char** environ;

namespace clonevm::cli {

pid_t DirectLauncher::launch(const ProcessSpec& spec) {
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(spec.program.c_str()));
  for (const auto& arg : spec.args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  // dup2 onto itself clears FD_CLOEXEC in the child (POSIX 2024, glibc >= 2.29).
  for (int fd : spec.keepFds) posix_spawn_file_actions_adddup2(&actions, fd, fd);
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, spec.program.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throwSystemError(rc, fmt::format("start {} ({})", spec.id, spec.kind), spec.program);
  return pid;
}

}  // namespace clonevm::cli
