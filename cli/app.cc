#include "cli/app.h"

#include <CLI/CLI.hpp>

#include "cli/exec_command.h"
#include "cli/global_options.h"
#include "cli/jailed_launcher.h"
#include "cli/run_command.h"
#include "cli/fork_commands.h"
#include "cli/vm_commands.h"
#include "clone/version.h"
#include "common/error.h"
#include "common/log.h"

namespace clonevm::cli {
namespace {

// CLI11 prints through its own formatter; route output to our streams for testability.
int reportParseResult(CLI::App& app, const CLI::ParseError& error, Streams streams) {
  std::ostringstream out;
  std::ostringstream err;
  int code = app.exit(error, out, err);
  streams.out << out.str();
  streams.err << err.str();
  return code;
}

}  // namespace

int runApp(const std::vector<std::string>& args, Streams streams) {
  CLI::App app{"clone: fork warm KVM virtual machines like processes, every device in its own jail",
               "clone"};
  app.require_subcommand(1);
  GlobalOptions global;
  app.add_option("--log-level", global.logLevel, "trace|debug|info|warn|error|off")
      ->capture_default_str();
  app.add_flag("--log-json", global.logJson, "log one JSON object a line");

  auto* version = app.add_subcommand("version", "print the version");
  version->callback([&] { streams.out << "clone " << kVersion << "\n"; });

  RunOptions runOptions;
  int exitCode = 0;
  JailOptions jailOptions;
  JailedLauncher jailedLauncher(jailOptions);
  addRunCommand(app, runOptions, global, streams, exitCode, jailedLauncher);
  addJailOptions(*app.get_subcommand("run"), jailOptions);
  VmCommandOptions vmOptions;
  addVmCommands(app, vmOptions, streams);
  ExecOptions execOptions;
  addExecCommand(app, execOptions, streams, exitCode);
  ForkCommandOptions forkOptions;
  addForkCommands(app, forkOptions, streams, jailedLauncher);
  addJailOptions(*app.get_subcommand("fork"), jailOptions);

  std::vector<std::string> reversed(args.rbegin(), args.rend() - 1);
  try {
    app.parse(reversed);
  } catch (const CLI::ParseError& error) {
    auto leftover = app.remaining();
    if (!leftover.empty() && app.get_subcommands().empty()) {
      streams.err << "clone: unknown verb '" << leftover.front() << "' (see clone --help)\n";
      return 2;
    }
    return reportParseResult(app, error, streams);
  } catch (const Error& error) {
    streams.err << "clone: " << error.what() << "\n";
    return 1;
  }
  return exitCode;
}

}  // namespace clonevm::cli
