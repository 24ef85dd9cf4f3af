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
  posix_spawnattr_t attributes;
  posix_spawn_file_actions_init(&actions);
  posix_spawnattr_init(&attributes);
  prepareSpawn(spec, actions, attributes);
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, spec.program.c_str(), &actions, &attributes, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  if (rc != 0) throwSystemError(rc, fmt::format("start {} ({})", spec.id, spec.kind), spec.program);
  return pid;
}

}  // namespace clonevm::cli
