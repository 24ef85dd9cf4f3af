#pragma once

#include <string>
#include <vector>

namespace clonevm::cli {

// Options every verb accepts, passed on to the programs a verb starts.
struct GlobalOptions {
  std::string logLevel = "info";
  bool logJson = false;

  std::vector<std::string> toArgs() const {
    std::vector<std::string> args{"--log-level", logLevel};
    if (logJson) args.push_back("--log-json");
    return args;
  }
};

}  // namespace clonevm::cli
