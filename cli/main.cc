#include <iostream>

#include "cli/app.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  return clonevm::cli::runApp(args, {std::cout, std::cerr});
}
