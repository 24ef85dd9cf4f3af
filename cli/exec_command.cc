#include "cli/exec_command.h"

#include <cerrno>
#include <chrono>

#include "cli/agent_client.h"
#include "cli/vm_commands.h"
#include "common/error.h"

namespace clonevm::cli {
namespace {

// The agent's default environment, which --env entries extend or override.
std::vector<std::string> commandEnvironment(const std::vector<std::string>& extra) {
  std::vector<std::string> env = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=linux"};
  for (const auto& entry : extra) {
    auto equals = entry.find('=');
    require(equals != std::string::npos && equals > 0, "--env {}: want KEY=VALUE", entry);
    std::string key = entry.substr(0, equals + 1);
    std::erase_if(env, [&](const std::string& e) { return e.starts_with(key); });
    env.push_back(entry);
  }
  return env;
}

int runExec(const ExecOptions& options, Streams streams) {
  require(options.socket.empty() != (options.cid == 0), "clone exec: give --vm SOCKET or --cid N");
  uint32_t cid = options.cid;
  if (!options.socket.empty()) {
    cid = vmVsockCid(options.socket);
    require(cid != 0, "VM {} has no vsock device (started with --no-vsock?)", options.socket);
  }
  auto connectTimeout = std::chrono::milliseconds(static_cast<int64_t>(options.connectTimeoutSeconds * 1000));
  AgentConnection connection = AgentConnection::connect(cid, options.port, connectTimeout);
  ExecRequest request{options.command, std::nullopt};
  if (!options.env.empty()) request.env = commandEnvironment(options.env);
  std::optional<std::chrono::milliseconds> timeout;
  if (options.timeoutSeconds > 0) {
    timeout = std::chrono::milliseconds(static_cast<int64_t>(options.timeoutSeconds * 1000));
  }
  streams.out.flush();
  streams.err.flush();
  try {
    return exec(connection, request, 0, 1, 2, timeout).exitCode();
  } catch (const AgentError& error) {
    streams.err << "clone: " << error.what() << "\n";
    // The shell's codes for a command that cannot run.
    if (error.errorCode() == ENOENT) return 127;
    if (error.errorCode() == EACCES || error.errorCode() == ENOEXEC) return 126;
    return 1;
  } catch (const Error& error) {
    if (std::string(error.what()).find("timed out") != std::string::npos) {
      streams.err << "clone: exec: timed out after " << options.timeoutSeconds
                  << " s; the command was killed\n";
      return 124;  // as timeout(1)
    }
    throw;
  }
}

}  // namespace

void addExecCommand(CLI::App& app, ExecOptions& options, Streams streams, int& exitCode) {
  auto* verb = app.add_subcommand(
      "exec", "run a command in a VM through its guest agent, with this terminal's stdio");
  verb->add_option("--vm", options.socket, "the VM's API socket (clone run --api-socket)");
  verb->add_option("--cid", options.cid, "the guest's vsock CID instead of --vm (debugging)")
      ->check(CLI::Range(3u, 0xfffffffeu));
  verb->add_option("--port", options.port, "the agent's vsock port")->capture_default_str();
  verb->add_option("--timeout", options.timeoutSeconds,
                   "give up after S seconds and kill the command (exit 124); default: no limit");
  verb->add_option("--connect-timeout", options.connectTimeoutSeconds,
                   "wait this long for the agent to listen")
      ->capture_default_str();
  verb->add_option("--env", options.env,
                   "KEY=VALUE for the command's environment (added to the default); repeatable")
      ->allow_extra_args(false);
  verb->add_option("command", options.command, "the command and its arguments (after --)")
      ->required();
  verb->callback([&options, streams, &exitCode] { exitCode = runExec(options, streams); });
}

}  // namespace clonevm::cli
