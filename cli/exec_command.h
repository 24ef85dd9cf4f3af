#pragma once
// `clone exec (--vm SOCKET | --cid N) [--timeout S] [--env K=V]... -- CMD ARGS...`: runs a
// command in a VM through its guest agent (docs/AGENT.md), with this process's stdin,
// stdout and stderr, and exits with the command's exit code (128 + signal).

#include <CLI/CLI.hpp>

#include "cli/app.h"

namespace clonevm::cli {

struct ExecOptions {
  std::string socket;
  uint32_t cid = 0;
  uint32_t port = 1024;
  double timeoutSeconds = 0;          // 0: no limit
  double connectTimeoutSeconds = 30;  // waiting for the agent to listen (a booting VM)
  std::vector<std::string> env;
  std::vector<std::string> command;
};

// Adds the `exec` verb; `exitCode` receives the command's exit code.
void addExecCommand(CLI::App& app, ExecOptions& options, Streams streams, int& exitCode);

}  // namespace clonevm::cli
