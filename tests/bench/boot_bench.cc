// Boot-to-userspace time of any VMM command line: spawn it, wait for the guest's marker on
// the serial console, power the guest off. Used by tests/bench/boot.sh to put Clone and QEMU
// side by side in one run.
//
//   clone-boot-bench --runs N --label NAME [--marker TEXT] -- PROGRAM ARGS...
#include <algorithm>
#include <chrono>
#include <iostream>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "tests/support/guest_session.h"

int main(int argc, char** argv) {
  CLI::App app{"boot-to-userspace benchmark"};
  int runs = 5;
  std::string label = "vmm";
  std::string marker = "CLONE-GUEST-READY";
  std::vector<std::string> command;
  app.add_option("--runs", runs)->check(CLI::Range(1, 1000));
  app.add_option("--label", label);
  app.add_option("--marker", marker);
  app.add_option("command", command)->required();
  CLI11_PARSE(app, argc, argv);

  std::vector<double> millis;
  for (int run = 0; run < runs; ++run) {
    auto start = std::chrono::steady_clock::now();
    clonevm::e2e::GuestSession vm(command.front(), {command.begin() + 1, command.end()});
    if (!vm.expect(marker, std::chrono::seconds(300))) {
      std::cerr << label << ": no marker '" << marker << "' in run " << run << "\n"
                << vm.output() << "\n";
      return 1;
    }
    double elapsed =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    millis.push_back(elapsed);
    vm.sendLine("poweroff -f");
    auto code = vm.waitExit(std::chrono::seconds(60));
    if (!code) {
      std::cerr << label << ": did not exit after poweroff in run " << run << "\n";
      return 1;
    }
    std::cout << fmt::format("{} run {}: boot to userspace {:.0f} ms (exit {})\n", label, run,
                             elapsed, *code);
  }
  std::sort(millis.begin(), millis.end());
  std::cout << fmt::format("RESULT {} boot_to_userspace_ms median {:.0f} min {:.0f} max {:.0f}\n",
                           label, millis[millis.size() / 2], millis.front(), millis.back());
  return 0;
}
