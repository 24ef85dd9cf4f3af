#pragma once
// The `clone` command line: verbs and global options. main() only wires streams to it,
// so tests can drive every verb in-process.

#include <ostream>
#include <string>
#include <vector>

namespace clonevm::cli {

struct Streams {
  std::ostream& out;
  std::ostream& err;
};

// Runs `clone` with argv-style `args` (args[0] is the program name); returns the exit code.
int runApp(const std::vector<std::string>& args, Streams streams);

}  // namespace clonevm::cli
