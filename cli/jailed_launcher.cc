#include "cli/jailed_launcher.h"

#include <spawn.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>

#include "cli/program_path.h"
#include "common/error.h"
#include "jailer/jail_config.h"

namespace clonevm::cli {
namespace {

constexpr uint64_t kProcessOverhead = 256ull << 20;
// Threads of one process (vCPUs, event loops, I/O workers) plus a margin; pids.max stops a
// compromised process from fork-bombing the host.
constexpr int kPidsMax = 512;

uint32_t parseId(std::string_view text, std::string_view what) {
  uint32_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  require(ec == std::errc() && end == text.data() + text.size() && !text.empty(),
          "--jail-user: {} '{}' is not a number", what, text);
  return value;
}

}  // namespace

void addJailOptions(CLI::App& run, JailOptions& options) {
  run.add_option("--jail-user", options.user,
                 "UID:GID every jailed process runs as (default: yours; as root, 0:0 with every "
                 "capability dropped)");
  run.add_option("--jail-cgroup-parent", options.cgroupParent,
                 "cgroup v2 directory the jails' cgroups are created in (default: "
                 "<cgroup2 mount>/clone)");
  run.add_option("--jail-userns", options.userns, "auto|on|off: user namespaces for the jails")
      ->capture_default_str();
}

uint64_t memoryLimitFor(const ProcessSpec& spec) {
  return spec.memoryBytes == 0 ? 0 : spec.memoryBytes + kProcessOverhead;
}

std::vector<std::string> JailedLauncher::jailerArguments(const ProcessSpec& spec) const {
  jailer::JailConfig config;
  config.id = spec.id;
  config.execFile = spec.program;
  config.args = spec.args;
  config.uid = ::getuid();
  config.gid = ::getgid();
  if (!options_.user.empty()) {
    auto colon = options_.user.find(':');
    require(colon != std::string::npos, "--jail-user '{}' must be UID:GID", options_.user);
    config.uid = parseId(std::string_view(options_.user).substr(0, colon), "UID");
    config.gid = parseId(std::string_view(options_.user).substr(colon + 1), "GID");
  }
  config.cgroupParent = options_.cgroupParent;
  if (uint64_t memory = memoryLimitFor(spec)) {
    config.cgroupLimits.push_back("memory.max=" + std::to_string(memory));
  }
  config.cgroupLimits.push_back("pids.max=" + std::to_string(kPidsMax * std::max(spec.processes, 1u)));
  config.readPaths = spec.readPaths;
  config.writePaths = spec.writePaths;
  config.devices = spec.devices;
  config.keepFds = spec.keepFds;
  config.network = spec.needsNetwork;
  if (options_.userns == "on") {
    config.userNamespace = jailer::UserNamespace::kOn;
  } else if (options_.userns == "off") {
    config.userNamespace = jailer::UserNamespace::kOff;
  } else {
    require(options_.userns == "auto", "--jail-userns '{}' must be auto, on or off", options_.userns);
  }
  jailer::validate(config);
  return jailer::toJailerArgs(config);
}

pid_t JailedLauncher::launch(const ProcessSpec& spec) {
  std::string jailer = options_.jailer.empty() ? siblingProgram("clone-jailer") : options_.jailer;
  auto args = jailerArguments(spec);
  std::vector<char*> argv{const_cast<char*>(jailer.c_str())};
  for (auto& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attributes;
  posix_spawn_file_actions_init(&actions);
  posix_spawnattr_init(&attributes);
  prepareSpawn(spec, actions, attributes);  // the jailer passes its stdio and fds on
  pid_t pid = 0;
  char* noEnvironment[] = {nullptr};
  int rc = ::posix_spawn(&pid, jailer.c_str(), &actions, &attributes, argv.data(), noEnvironment);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  if (rc != 0) throwSystemError(rc, "start", jailer);
  return pid;
}

}  // namespace clonevm::cli
