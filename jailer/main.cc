// clone-jailer: runs one process of a VM in its own jail, then waits for it (docs/JAILER.md).
//
// Exit code: the jailed process's own, 128 + N if signal N ended it, 125 if the jail could not
// be built inside the new process, 2 for a bad command line, 1 for any other setup failure.
#include <iostream>

#include "common/error.h"
#include "jailer/jail.h"

int main(int argc, char** argv) {
  using namespace clonevm;
  std::vector<std::string> args(argv + 1, argv + argc);
  jailer::JailConfig config;
  try {
    config = jailer::parseJailerArgs(args);
  } catch (const jailer::HelpRequested& help) {
    std::cout << help.text;
    return 0;
  } catch (const Error& error) {
    std::cerr << "clone-jailer: " << error.what() << "\n";
    return 2;
  }
  try {
    return jailer::runJailed(config);
  } catch (const std::exception& error) {
    std::cerr << "clone-jailer: " << error.what() << "\n";
    return 1;
  }
}
