// Issue 7 benchmark: fork latency (clone-vmm --restore of a template, until the guest answers
// on its serial console) side by side with Clone's cold boot and QEMU restoring the same guest
// from a migration file (-incoming "exec:cat FILE"); then the private memory of idle forks
// (PSS from /proc/PID/smaps_rollup). Needs /dev/kvm: tests/bench/fork.sh runs it in the lab.
#include <dirent.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <thread>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "tests/support/guest_session.h"

using namespace clonevm::e2e;
using Clock = std::chrono::steady_clock;

namespace {

const std::string kCmdline = "console=ttyS0 panic=-1 quiet";

double msSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t index = static_cast<size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[std::min(index, values.size() - 1)];
}

bool answers(GuestSession& vm, std::chrono::milliseconds timeout = 120s) {
  // Bytes typed while a restore is still loading can be lost (QEMU's UART state is replaced
  // when the migration stream arrives): press Enter until the shell prompts, for every VM
  // alike, then ask.
  auto deadline = Clock::now() + timeout;
  do {
    vm.sendLine("");
  } while (!vm.expect("# ", 100ms) && Clock::now() < deadline);
  auto answer = vm.run("echo R-$((40+2))", timeout);
  return answer && *answer == "R-42";
}

void powerOff(GuestSession& vm) {
  vm.sendLine("poweroff -f");
  vm.waitExit(20s);
}

// Connects to QEMU's HMP monitor socket and sends one command line; returns what it printed.
std::string hmp(const std::string& socket, const std::string& command) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::snprintf(address.sun_path, sizeof(address.sun_path), "%s", socket.c_str());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    ::close(fd);
    return "";
  }
  std::string line = command + "\n";
  std::this_thread::sleep_for(200ms);  // the banner
  (void)!::write(fd, line.data(), line.size());
  std::this_thread::sleep_for(500ms);
  char buffer[8192];
  std::string out;
  timeval tv{0, 200000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ssize_t n;
  while ((n = ::read(fd, buffer, sizeof(buffer))) > 0) out.append(buffer, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

std::vector<int> pidsWithArgument(const std::string& argument) {
  std::vector<int> pids;
  DIR* proc = ::opendir("/proc");
  while (dirent* entry = ::readdir(proc)) {
    int pid = std::atoi(entry->d_name);
    if (pid <= 0) continue;
    std::ifstream cmdline(fmt::format("/proc/{}/cmdline", pid));
    std::string text((std::istreambuf_iterator<char>(cmdline)), {});
    std::replace(text.begin(), text.end(), '\0', ' ');
    if (text.find(argument) != std::string::npos) pids.push_back(pid);
  }
  ::closedir(proc);
  return pids;
}

uint64_t pssKib(int pid) {
  std::ifstream rollup(fmt::format("/proc/{}/smaps_rollup", pid));
  std::string key;
  uint64_t value;
  while (rollup >> key) {
    if (key == "Pss:") {
      rollup >> value;
      return value;
    }
    rollup.ignore(1 << 10, '\n');
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"clone-fork-bench"};
  std::string dir = "/tmp/clone-fork-bench";
  int forks = 20, boots = 3, qemuRestores = 5, pssForks = 20, memMib = 256, idleSeconds = 60;
  app.add_option("--dir", dir);
  app.add_option("--forks", forks);
  app.add_option("--boots", boots);
  app.add_option("--qemu-restores", qemuRestores);
  app.add_option("--pss-forks", pssForks);
  app.add_option("--idle-seconds", idleSeconds);
  app.add_option("--mem-mb", memMib);
  CLI11_PARSE(app, argc, argv);
  std::cout << std::unitbuf;  // partial results survive a timeout
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::string templateDir = dir + "/template";
  std::string mem = std::to_string(memMib);

  // The template.
  {
    GuestSession vm(buildBin("clone-vmm"),
                    {"--kernel", guestKernel(), "--initrd", guestInitrd(), "--cmdline", kCmdline,
                     "--mem-mb", mem, "--api-socket", dir + "/template.sock"});
    if (!vm.expect("CLONE-GUEST-READY") || !answers(vm)) {
      std::cerr << "template did not boot\n" << vm.output();
      return 1;
    }
    GuestSession snap(buildBin("clone"), {"snapshot", "--vm", dir + "/template.sock", "--output", templateDir});
    snap.closeInput();
    if (snap.waitExit(120s) != 0) {
      std::cerr << "snapshot failed\n" << snap.output();
      return 1;
    }
    std::cout << "snapshot: " << snap.output();
    powerOff(vm);
  }

  // Fork latency: from starting clone-vmm --restore to the answer on the console.
  std::vector<double> forkMs;
  for (int i = 0; i < forks; ++i) {
    auto start = Clock::now();
    GuestSession fork(buildBin("clone-vmm"), {"--restore", templateDir});
    if (!answers(fork)) {
      std::cerr << "fork did not answer\n" << fork.output();
      return 1;
    }
    forkMs.push_back(msSince(start));
    std::cout << fmt::format("fork {}: {:.1f} ms{}\n", i, forkMs.back(), i == 0 ? " (records the working set)" : "");
    powerOff(fork);
  }

  // Clone cold boot to the same answer.
  std::vector<double> bootMs;
  for (int i = 0; i < boots; ++i) {
    auto start = Clock::now();
    GuestSession vm(buildBin("clone-vmm"), {"--kernel", guestKernel(), "--initrd", guestInitrd(),
                                            "--cmdline", kCmdline, "--mem-mb", mem});
    if (!vm.expect("CLONE-GUEST-READY") || !answers(vm)) return 1;
    bootMs.push_back(msSince(start));
    std::cout << fmt::format("clone cold boot {}: {:.1f} ms\n", i, bootMs.back());
    powerOff(vm);
  }

  // QEMU: boot, migrate to a file, then restore from it.
  std::vector<double> qemuMs;
  std::string monitor = dir + "/qemu.monitor";
  std::string stateFile = dir + "/qemu.migration";
  std::vector<std::string> qemu = {"-accel", "kvm", "-M", "q35", "-cpu", "host", "-m", mem,
                                   "-smp", "1", "-nodefaults", "-nographic", "-no-reboot",
                                   "-serial", "stdio", "-kernel", guestKernel(), "-initrd",
                                   guestInitrd(), "-append", kCmdline};
  if (qemuRestores > 0) {
    auto args = qemu;
    args.insert(args.end(), {"-monitor", "unix:" + monitor + ",server=on,wait=off"});
    GuestSession vm("/usr/bin/qemu-system-x86_64", args);
    if (!vm.expect("CLONE-GUEST-READY") || !answers(vm)) {
      std::cerr << "QEMU did not boot\n" << vm.output();
      return 1;
    }
    hmp(monitor, "migrate \"exec:cat > " + stateFile + "\"");
    bool done = false;
    for (int i = 0; i < 120 && !done; ++i) {
      done = hmp(monitor, "info migrate").find("completed") != std::string::npos;
    }
    hmp(monitor, "quit");
    vm.waitExit(20s);
    if (!done) {
      std::cerr << "QEMU migration to a file did not complete\n";
      qemuRestores = 0;
    }
    std::cout << fmt::format("QEMU migration file: {} MiB\n",
                             std::filesystem::file_size(stateFile) >> 20);
  }
  for (int i = 0; i < qemuRestores; ++i) {
    auto args = qemu;
    args.insert(args.end(), {"-incoming", "exec:cat " + stateFile});
    auto start = Clock::now();
    GuestSession vm("/usr/bin/qemu-system-x86_64", args);
    if (!answers(vm)) {
      std::cerr << "QEMU restore did not answer\n" << vm.output();
      return 1;
    }
    qemuMs.push_back(msSince(start));
    std::cout << fmt::format("qemu restore {}: {:.1f} ms\n", i, qemuMs.back());
    powerOff(vm);
  }

  // Private memory of idle forks.
  std::vector<double> pssMib;
  if (pssForks > 0) {
    std::vector<std::unique_ptr<GuestSession>> idle;
    for (int i = 0; i < pssForks; ++i) {
      idle.push_back(std::make_unique<GuestSession>(
          buildBin("clone-vmm"),
          std::vector<std::string>{"--restore", templateDir, "--api-socket", fmt::format("{}/pss-{}.sock", dir, i)}));
    }
    for (auto& vm : idle) {
      if (!answers(*vm)) return 1;
    }
    std::this_thread::sleep_for(std::chrono::seconds(idleSeconds));
    for (int i = 0; i < pssForks; ++i) {
      uint64_t kib = 0;
      // Every process of the fork: only clone-vmm so far (no device processes).
      for (int pid : pidsWithArgument(fmt::format("{}/pss-{}.sock", dir, i))) kib += pssKib(pid);
      pssMib.push_back(static_cast<double>(kib) / 1024.0);
    }
    for (auto& vm : idle) powerOff(*vm);
  }

  std::vector<double> warm(forkMs.begin() + (forkMs.size() > 1 ? 1 : 0), forkMs.end());
  std::cout << fmt::format("RESULT fork_ms p50 {:.1f} p99 {:.1f} (n={}, first fork {:.1f})\n",
                           percentile(warm, 0.5), percentile(warm, 0.99), warm.size(),
                           forkMs.empty() ? 0.0 : forkMs[0]);
  std::cout << fmt::format("RESULT clone_cold_boot_ms p50 {:.1f} (n={})\n", percentile(bootMs, 0.5), bootMs.size());
  if (!qemuMs.empty()) {
    std::cout << fmt::format("RESULT qemu_restore_ms p50 {:.1f} p99 {:.1f} (n={})\n",
                             percentile(qemuMs, 0.5), percentile(qemuMs, 0.99), qemuMs.size());
    std::cout << fmt::format("RESULT ratio qemu_restore/clone_fork p50 {:.2f}\n",
                             percentile(qemuMs, 0.5) / percentile(warm, 0.5));
  }
  std::cout << fmt::format("RESULT ratio clone_cold_boot/clone_fork p50 {:.2f}\n",
                           percentile(bootMs, 0.5) / percentile(warm, 0.5));
  if (!pssMib.empty()) {
    std::cout << fmt::format("RESULT fork_pss_mib median {:.1f} min {:.1f} max {:.1f} (n={}, idle {} s)\n",
                             percentile(pssMib, 0.5), *std::min_element(pssMib.begin(), pssMib.end()),
                             *std::max_element(pssMib.begin(), pssMib.end()), pssMib.size(), idleSeconds);
  }
  return 0;
}
