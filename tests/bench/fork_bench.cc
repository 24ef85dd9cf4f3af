// Issue 7 benchmark, one run, side by side:
// - Clone forks: from spawning `clone-vmm --restore TEMPLATE` until the guest agent in the fork
//   has run `true` (vsock connect to the fork's CID, EXEC, exit code back), each fork powered
//   off after it is measured, so --forks 100 needs the memory of one fork at a time;
// - Clone cold boots, to the same agent answer;
// - QEMU restoring the same guest from a migration file (-incoming "exec:cat FILE"), to the
//   answer of `echo` on its serial console (QEMU's guest has no Clone agent);
// - a few forks measured to the serial answer too, the same probe as QEMU's;
// - with a disk (--disk-forks): `clone fork` + `clone exec` of a template that has a
//   clone-block disk, beside QEMU restores of the same guest with a virtio-blk disk;
// - the private memory of idle forks: PSS of every process of each fork, summed, and where it
//   goes (a /proc/PID/smaps breakdown by kind of mapping), and how much of its guest memory is
//   still byte-identical to the template's.
// Needs /dev/kvm and vhost-vsock: run it in the lab (docs/BENCHMARKS.md has the command).
#include <dirent.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <memory>
#include <sstream>
#include <thread>
#include <tuple>

#include <CLI/CLI.hpp>
#include <fmt/chrono.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "cli/agent_client.h"
#include "ipc/capnp/rpc_socket.h"
#include "ipc/fork-server/fork_request.h"
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

// KVM's counters for one VM (L1's debugfs, /sys/kernel/debug/kvm/PID-FD: its vCPUs' summed),
// to see what a fork's guest made KVM do between two reads. Empty without debugfs.
std::map<std::string, uint64_t> kvmVmStats(pid_t pid) {
  std::map<std::string, uint64_t> stats;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/sys/kernel/debug/kvm", error)) {
    std::string name = entry.path().filename().string();
    if (name.rfind(fmt::format("{}-", pid), 0) != 0) continue;
    for (const auto& file : std::filesystem::directory_iterator(entry.path(), error)) {
      std::ifstream in(file.path());
      uint64_t value = 0;
      if (file.is_regular_file(error) && in >> value) stats[file.path().filename().string()] = value;
    }
  }
  return stats;
}

std::string kvmStatsDelta(const std::map<std::string, uint64_t>& before,
                          const std::map<std::string, uint64_t>& after) {
  std::string line;
  for (const auto& [name, value] : after) {
    auto was = before.find(name);
    // Signed: a few entries are gauges (blocking), which can fall.
    int64_t delta = static_cast<int64_t>(value - (was == before.end() ? 0 : was->second));
    if (delta != 0 && name.find("hist") == std::string::npos) line += fmt::format(" {}={}", name, delta);
  }
  return line.empty() ? " (no counters: debugfs not mounted?)" : line;
}

// One `clone` command, its input closed, waited for. code: its exit code (nullopt: timeout).
struct CloneRun {
  std::optional<int> code;
  std::string output;
  bool ok() const { return code == 0; }
};
CloneRun runClone(const std::vector<std::string>& args, std::chrono::milliseconds timeout) {
  GuestSession command(buildBin("clone"), args);
  command.closeInput();
  auto code = command.waitExit(timeout);
  return {code, command.output()};
}

void powerOff(GuestSession& vm) {
  vm.sendLine("poweroff -f");
  vm.waitExit(20s);
}

// Ends a VM by powering its guest off. A VM whose process does not exit in time is left
// running (and counted): killing it can leave it in the kernel for good (seen in the lab:
// SIGKILLed forks stuck in vhost_vsock_dev_release), and the destructor's waitpid would
// then stop the benchmark.
int stuckAtExit = 0;
void destroy(std::unique_ptr<GuestSession>& vm) {
  vm->sendLine("poweroff -f");
  if (vm->waitExit(30s)) {
    vm.reset();
    return;
  }
  stuckAtExit++;
  std::cerr << "a VM did not exit 30 s after poweroff; left running\n";
  (void)vm.release();
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

// The memfds `pids` hold, each counted once (the core and its clone-block share one): their
// allocated shmem in KiB. PSS counts only mapped pages, and a fork whose memory was filled up
// front unmaps most of its memfd from the core while the memfd keeps every page.
uint64_t memfdKib(const std::vector<int>& pids) {
  std::set<std::pair<dev_t, ino_t>> seen;
  uint64_t kib = 0;
  for (int pid : pids) {
    std::error_code error;
    for (const auto& fd : std::filesystem::directory_iterator(fmt::format("/proc/{}/fd", pid), error)) {
      std::error_code gone;
      if (!std::filesystem::read_symlink(fd.path(), gone).string().starts_with("/memfd:")) continue;
      struct stat info {};
      if (::stat(fd.path().c_str(), &info) != 0 || !seen.insert({info.st_dev, info.st_ino}).second) continue;
      kib += static_cast<uint64_t>(info.st_blocks) * 512 / 1024;
    }
  }
  return kib;
}

// Connects to the guest agent at `cid` (retrying every 5 ms while the fork's vsock is not up
// or nobody listens yet) and runs `true`; true when it exited 0. `error` says why not.
// Reads what the VM printed (console and log) so its pipe never fills and stalls it.
void drain(GuestSession* vm, std::chrono::milliseconds wait) {
  if (vm == nullptr) {
    std::this_thread::sleep_for(wait);
    return;
  }
  (void)vm->expect("\x01no such text\x01", wait);
  // All of it: expect() reads one 4 KiB chunk per poll, and a fork server's log outgrew that
  // (64 server forks filled its pipe, and it stalled writing to it).
  vm->drainAvailable();
}

// L1's ftrace, switched on only around chosen forks' request-to-answer windows, with a marker
// at each step, so that a trace of the scheduler and KVM shows where such a window went
// (`--trace-forks`; the events to record are enabled by whoever runs the bench).
class TraceWindow {
 public:
  explicit TraceWindow(bool wanted) {
    if (!wanted) return;
    marker_ = clonevm::UniqueFd(::open("/sys/kernel/tracing/trace_marker", O_WRONLY | O_CLOEXEC));
    on_ = clonevm::UniqueFd(::open("/sys/kernel/tracing/tracing_on", O_WRONLY | O_CLOEXEC));
    if (!marker_ || !on_) std::cerr << "--trace-forks: no /sys/kernel/tracing (mount tracefs): not traced\n";
  }
  void begin(const std::string& what) {
    if (switchTo("1")) mark(what);
  }
  void mark(const std::string& what) const {
    if (marker_ && ::write(marker_.get(), what.data(), what.size()) < 0) {
      std::cerr << "trace_marker: " << std::strerror(errno) << "\n";
    }
  }
  void end(const std::string& what) {
    mark(what);
    switchTo("0");
  }

 private:
  bool switchTo(const char* value) {
    return on_ && ::write(on_.get(), value, 1) == 1;
  }
  clonevm::UniqueFd marker_, on_;
};

// How a probe went: connect attempts and when the answering one connected.
struct ProbeTrace {
  int attempts = 0;
  double connectedMs = 0;
  const TraceWindow* trace = nullptr;  // marks the connect, when set
};

bool agentAnswers(uint32_t cid, std::chrono::milliseconds timeout, std::string& error,
                  GuestSession* vm = nullptr, ProbeTrace* trace = nullptr) {
  auto begin = Clock::now();
  auto deadline = begin + timeout;
  ProbeTrace unused;
  ProbeTrace& probe = trace != nullptr ? *trace : unused;
  while (true) {
    probe.attempts++;
    clonevm::UniqueFd fd(::socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) {
      error = fmt::format("socket(AF_VSOCK): {}", std::strerror(errno));
      return false;
    }
    timeval tv{1, 0};
    ::setsockopt(fd.get(), AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
    sockaddr_vm address{};
    address.svm_family = AF_VSOCK;
    address.svm_cid = cid;
    address.svm_port = clonevm::cli::kAgentPort;
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
      probe.connectedMs = msSince(begin);
      if (probe.trace != nullptr) probe.trace->mark("clone-bench: connected");
      try {
        clonevm::cli::AgentConnection connection(std::move(fd));
        clonevm::UniqueFd devNull(::open("/dev/null", O_WRONLY | O_CLOEXEC));
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        auto result = clonevm::cli::exec(connection, {{"true"}, std::nullopt}, -1, devNull.get(),
                                         devNull.get(), std::max(left, 1000ms));
        if (result.exitCode() == 0) return true;
        error = fmt::format("`true` exited {}", result.exitCode());
        return false;
      } catch (const std::exception& e) {
        // The connection reset by the fork's vsock transport reset: try again.
        error = e.what();
      }
    } else {
      error = fmt::format("connect to CID {}: {}", cid, std::strerror(errno));
    }
    if (Clock::now() >= deadline) return false;
    drain(vm, 5ms);
  }
}

// PSS of one process by kind of mapping (/proc/PID/smaps), in KiB. Anonymous mappings of
// exactly 8 MiB are counted as thread stacks (glibc's default stack size), the other anonymous
// ones as malloc heap/arenas: a heuristic, named so in the output.
std::map<std::string, uint64_t> pssByKind(int pid, const std::string& templateDir) {
  std::map<std::string, uint64_t> kinds;
  std::ifstream smaps(fmt::format("/proc/{}/smaps", pid));
  std::string line, kind;
  while (std::getline(smaps, line)) {
    if (line.empty()) continue;
    auto colon = line.find(':');
    bool header = colon == std::string::npos || line.find('-') < colon;
    if (header && std::isxdigit(static_cast<unsigned char>(line[0]))) {
      std::istringstream fields(line);
      std::string range, perms, offset, dev, inode, name;
      fields >> range >> perms >> offset >> dev >> inode;
      std::getline(fields >> std::ws, name);
      auto dash = range.find('-');
      uint64_t bytes = std::stoull(range.substr(dash + 1), nullptr, 16) -
                       std::stoull(range.substr(0, dash), nullptr, 16);
      if (name.starts_with("/memfd:")) kind = "guest memory (memfd)";
      else if (name.starts_with(templateDir)) kind = "template image (shared page cache)";
      else if (name == "[heap]") kind = "malloc heap ([heap])";
      else if (name == "[stack]") kind = "main stack";
      else if (name.starts_with("anon_inode:")) kind = "kvm/anon_inode";
      else if (name.empty()) kind = bytes == (8u << 20) ? "thread stacks (8 MiB anon)" : "anon other (arenas, mmap)";
      else if (name.starts_with("[")) kind = "kernel ([vdso] etc)";
      else if (name.find("clone-vmm") != std::string::npos) kind = "clone-vmm binary";
      else kind = "shared libraries and other files";
      continue;
    }
    if (line.starts_with("Pss:")) {
      kinds[kind] += std::stoull(line.substr(4));
    }
  }
  return kinds;
}

// One line of /proc/PID/maps.
struct Mapping {
  uint64_t from = 0, to = 0, offset = 0;
  std::string perms, name;
};
std::vector<Mapping> mappingsOf(int pid) {
  std::vector<Mapping> mappings;
  std::ifstream maps(fmt::format("/proc/{}/maps", pid));
  for (std::string line; std::getline(maps, line);) {
    std::istringstream fields(line);
    std::string range, offset, dev, inode;
    Mapping m;
    fields >> range >> m.perms >> offset >> dev >> inode;
    std::getline(fields >> std::ws, m.name);
    auto dash = range.find('-');
    m.from = std::stoull(range.substr(0, dash), nullptr, 16);
    m.to = std::stoull(range.substr(dash + 1), nullptr, 16);
    m.offset = std::stoull(offset, nullptr, 16);
    mappings.push_back(std::move(m));
  }
  return mappings;
}

// A fork's resident guest pages (its memfd mapping) and how many of them are byte-identical
// to the template's memory file: what a copy-on-write mapping of the template would have kept
// shared (an upper bound: a page the guest rewrote with the same bytes counts as identical).
// Reads only pages the pagemap says are present, so the fork's userfaultfd is never woken.
struct TemplatePages {
  uint64_t resident = 0;
  uint64_t identical = 0;
};
TemplatePages templatePagesOf(int pid, const std::string& templateMemory) {
  constexpr uint64_t kPage = 4096;
  uint64_t start = 0, end = 0, fileOffset = 0;
  for (const auto& m : mappingsOf(pid)) {
    if (m.name.starts_with("/memfd:") && m.perms == "rw-s" && m.to - m.from > end - start) {
      start = m.from, end = m.to, fileOffset = m.offset;
    }
  }
  TemplatePages pages;
  int pagemap = ::open(fmt::format("/proc/{}/pagemap", pid).c_str(), O_RDONLY | O_CLOEXEC);
  int mem = ::open(fmt::format("/proc/{}/mem", pid).c_str(), O_RDONLY | O_CLOEXEC);
  int image = ::open(templateMemory.c_str(), O_RDONLY | O_CLOEXEC);
  if (pagemap >= 0 && mem >= 0 && image >= 0 && end > start) {
    std::vector<uint64_t> entries((end - start) / kPage);
    ssize_t got = ::pread(pagemap, entries.data(), entries.size() * 8, static_cast<off_t>(start / kPage * 8));
    std::vector<uint8_t> page(kPage), original(kPage);
    for (size_t i = 0; got > 0 && i < static_cast<size_t>(got) / 8; ++i) {
      if (!(entries[i] >> 63)) continue;  // not present
      pages.resident++;
      std::fill(original.begin(), original.end(), 0);  // beyond the file's end: zeros
      if (::pread(mem, page.data(), kPage, static_cast<off_t>(start + i * kPage)) == kPage &&
          ::pread(image, original.data(), kPage, static_cast<off_t>(fileOffset + i * kPage)) >= 0 &&
          page == original) {
        pages.identical++;
      }
    }
  }
  for (int fd : {pagemap, mem, image}) {
    if (fd >= 0) ::close(fd);
  }
  return pages;
}

// What the guest pages a copy-on-write fork owns are, by the guest kernel's own account: the
// fork's private pages in its mapping of the template (the pagemap: present, not file-backed,
// mapped by this process only), each looked up in the guest's /proc/kpageflags through the
// agent. The lookup runs after the list is taken, so its own writes are not counted.
std::map<std::string, uint64_t> ownedGuestPagesByKind(int pid, const std::string& templateMemory,
                                                      const std::string& socket, uint64_t guestBytes) {
  constexpr uint64_t kPage = 4096;
  std::map<std::string, uint64_t> kinds;
  std::string memoryPath = std::filesystem::canonical(templateMemory).string();
  uint64_t base = UINT64_MAX;
  for (const auto& m : mappingsOf(pid)) {
    if (m.name == memoryPath) base = std::min(base, m.from - m.offset);
  }
  if (base == UINT64_MAX) return {{"(no mapping of the template found)", 0}};
  std::vector<uint64_t> entries(guestBytes / kPage);
  int pagemap = ::open(fmt::format("/proc/{}/pagemap", pid).c_str(), O_RDONLY | O_CLOEXEC);
  ssize_t got = pagemap < 0 ? -1 : ::pread(pagemap, entries.data(), entries.size() * 8, static_cast<off_t>(base / kPage * 8));
  if (pagemap >= 0) ::close(pagemap);
  std::vector<uint64_t> owned;
  for (size_t i = 0; got > 0 && i < static_cast<size_t>(got) / 8; ++i) {
    bool present = entries[i] >> 63 & 1, fileOrShared = entries[i] >> 61 & 1, exclusive = entries[i] >> 56 & 1;
    if (present && !fileOrShared && exclusive) owned.push_back(i);
  }
  auto dump = runClone({"exec", "--vm", socket, "--", "od", "-An", "-tx8", "-v", "/proc/kpageflags"}, 300s);
  std::vector<uint64_t> flags;
  std::istringstream words(dump.output);
  for (std::string word; words >> word;) flags.push_back(std::stoull(word, nullptr, 16));
  // Bits of Documentation/admin-guide/mm/pagemap.rst, most telling first.
  const std::vector<std::pair<int, const char*>> kBits = {
      {26, "page table"}, {7, "slab"}, {10, "free (buddy)"}, {22, "transparent huge page"},
      {12, "anonymous (user memory)"}, {5, "page cache (lru)"}, {32, "reserved"},
      {24, "zero page"}};
  // The kernel image's sections by physical address, to tell its data from memblock's pages.
  std::vector<std::tuple<uint64_t, uint64_t, std::string>> sections;
  std::istringstream iomem(runClone({"exec", "--vm", socket, "--", "cat", "/proc/iomem"}, 60s).output);
  for (std::string line; std::getline(iomem, line);) {
    auto dash = line.find('-'), colon = line.find(" : ");
    if (dash == std::string::npos || colon == std::string::npos || line.find("Kernel ") == std::string::npos) continue;
    sections.emplace_back(std::stoull(line.substr(0, dash), nullptr, 16) / kPage,
                          std::stoull(line.substr(dash + 1, colon - dash - 1), nullptr, 16) / kPage,
                          "reserved: " + line.substr(colon + 3));
  }
  for (uint64_t pfn : owned) {
    std::string kind = "no flags (vmalloc: kernel stacks, modules, percpu, ...)";
    if (pfn >= flags.size()) kind = "beyond /proc/kpageflags";
    else {
      for (auto [bit, name] : kBits) {
        if (flags[pfn] >> bit & 1) { kind = name; break; }
      }
      if (kind.starts_with("no flags") && flags[pfn] != 0) kind = fmt::format("other flags {:#x}", flags[pfn]);
      if (kind.starts_with("reserved")) {
        kind = "reserved outside the kernel image (memblock: struct pages, percpu, early page tables)";
        for (const auto& [first, last, name] : sections) {
          if (pfn >= first && pfn <= last) kind = name;
        }
      }
    }
    kinds[kind] += 4;
  }
  kinds["(all owned guest pages)"] = owned.size() * 4;
  return kinds;
}

// The mappings of one process with the most PSS: "pss private size name" lines, in KiB.
std::vector<std::string> topMappings(int pid, size_t count) {
  std::vector<std::tuple<uint64_t, uint64_t, uint64_t, std::string>> rows;
  std::ifstream smaps(fmt::format("/proc/{}/smaps", pid));
  std::string line;
  while (std::getline(smaps, line)) {
    auto colon = line.find(':');
    if ((colon == std::string::npos || line.find('-') < colon) && !line.empty() &&
        std::isxdigit(static_cast<unsigned char>(line[0]))) {
      std::istringstream fields(line);
      std::string range, perms, offset, dev, inode, name;
      fields >> range >> perms >> offset >> dev >> inode;
      std::getline(fields >> std::ws, name);
      rows.emplace_back(0, 0, 0, perms + " " + (name.empty() ? "[anon]" : name));
    } else if (!rows.empty() && line.starts_with("Size:")) {
      std::get<2>(rows.back()) = std::stoull(line.substr(5));
    } else if (!rows.empty() && line.starts_with("Pss:")) {
      std::get<0>(rows.back()) = std::stoull(line.substr(4));
    } else if (!rows.empty() && (line.starts_with("Private_Clean:") || line.starts_with("Private_Dirty:"))) {
      std::get<1>(rows.back()) += std::stoull(line.substr(14));
    }
  }
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return std::get<0>(a) > std::get<0>(b); });
  std::vector<std::string> out;
  for (size_t i = 0; i < std::min(count, rows.size()); ++i) {
    auto& [pss, priv, size, name] = rows[i];
    out.push_back(fmt::format("pss {:6} private {:6} size {:8} {}", pss, priv, size, name));
  }
  return out;
}

int threadCount(int pid) {
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  std::string key;
  while (status >> key) {
    if (key == "Threads:") {
      int n = 0;
      status >> n;
      return n;
    }
    status.ignore(1 << 10, '\n');
  }
  return 0;
}

struct Latencies {
  std::vector<double> ms;
  int failures = 0;
  double p(double q) const { return percentile(ms, q); }
};

// Median, min, max and n of per-fork MiB.
std::string describeMib(const std::vector<double>& mib) {
  if (mib.empty()) return "none measured";
  return fmt::format("median {:.2f} min {:.2f} max {:.2f} (n={})", percentile(mib, 0.5),
                     *std::min_element(mib.begin(), mib.end()), *std::max_element(mib.begin(), mib.end()), mib.size());
}

std::string describe(const Latencies& l) {
  if (l.ms.empty()) return fmt::format("none measured ({} failed)", l.failures);
  return fmt::format("p50 {:.1f} p99 {:.1f} min {:.1f} max {:.1f} (n={}, failed {})", l.p(0.5),
                     l.p(0.99), *std::min_element(l.ms.begin(), l.ms.end()),
                     *std::max_element(l.ms.begin(), l.ms.end()), l.ms.size(), l.failures);
}

// A fork server (clone-vmm --restore T --fork-server-fd N, unjailed like the bench's other
// forks) and its forks, each with its own API socket and console log in `dir`.
class ForkServer {
 public:
  ForkServer(const std::string& vmm, std::vector<std::string> args) {
    auto [client, server] = clonevm::ipc::makeForkSocketPair();
    ::fcntl(server.get(), F_SETFD, 0);  // inherited by the server only
    args.insert(args.end(), {"--fork-server-fd", std::to_string(server.get())});
    session_ = std::make_unique<GuestSession>(vmm, args);
    client_ = std::move(client);
  }
  // Whether it started (checked the template) within `timeout`.
  bool ready(std::chrono::milliseconds timeout) { return session_->expect("fork server: ready", timeout); }
  // Asks for one fork (cid 0: the server picks it); returns its pid (the server is in our pid
  // namespace) and CID, or pid 0 after printing why not.
  clonevm::ipc::ForkReply fork(const std::string& dir, const std::string& name, uint32_t cid = 0) {
    clonevm::ipc::ForkRequest request;
    request.forkId = name;
    request.apiSocketName = fmt::format("{}/{}.sock", dir, name);
    request.vsockCid = cid;
    try {
      request.apiListener = clonevm::rpc::bindUnixListener(request.apiSocketName);
      request.output = clonevm::UniqueFd(::open(fmt::format("{}/{}.console", dir, name).c_str(),
                                                O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
      clonevm::ipc::sendForkRequest(client_.get(), request);
      auto reply = clonevm::ipc::receiveForkReply(client_.get());
      if (!reply.error.empty()) std::cerr << "fork server refused " << name << ": " << reply.error << "\n";
      if (reply.pid > 0) forks_.push_back(reply.pid);
      return reply;
    } catch (const std::exception& error) {
      std::cerr << "fork server request " << name << ": " << error.what() << "\n" << session_->output();
      return {};
    }
  }
  // Its forks would outlive a killed server (they are its children, not in a pid namespace of
  // its own here): end them with it.
  ~ForkServer() {
    for (pid_t pid : forks_) ::kill(pid, SIGKILL);
  }
  // Ends one of its forks and waits until the server has reaped it.
  void endFork(pid_t pid) {
    ::kill(pid, SIGKILL);
    for (int i = 0; i < 2000 && ::kill(pid, 0) == 0; ++i) std::this_thread::sleep_for(1ms);
    std::erase(forks_, pid);
  }
  GuestSession& session() { return *session_; }
  // Hangs up and waits for the server to end (after its forks, which the caller ended).
  std::optional<int> stop() {
    client_.reset();
    return session_->waitExit(30s);
  }

 private:
  std::unique_ptr<GuestSession> session_;
  clonevm::UniqueFd client_;
  std::vector<pid_t> forks_;
};


// The children of `pid` (a fork's clone-blocks, a server's spare).
std::vector<pid_t> childrenOf(pid_t pid) {
  std::vector<pid_t> children;
  std::ifstream list(fmt::format("/proc/{0}/task/{0}/children", pid));
  for (pid_t child; list >> child;) children.push_back(child);
  return children;
}

// Idle forks of one fork server, measured after `idleSeconds`: each fork's PSS with its
// children's (the clone-blocks of a template with disks) plus 1/n of the server's, which
// exists for them (with its spare and the spare's children).
struct ServerForkPss {
  std::vector<double> mib;
  std::vector<double> memfdMib;  // each fork's memfd shmem, mapped or not (memfd forks)
  uint64_t serverKib = 0;
  int failures = 0;              // forks whose agent did not answer, left out
};

bool measureServerForkPss(const std::string& vmm, const std::vector<std::string>& serverArgs, const std::string& dir,
                          const std::string& name, int count, int idleSeconds, const std::string& templateDir,
                          ServerForkPss& result) {
  ForkServer server(vmm, serverArgs);
  if (!server.ready(60s)) {
    std::cerr << name << ": the fork server did not start\n" << server.session().output();
    return false;
  }
  std::vector<pid_t> pids;
  std::vector<uint32_t> cids;
  for (int i = 0; i < count; ++i) {
    auto reply = server.fork(dir, fmt::format("{}-{}", name, i));
    if (reply.pid <= 0 || reply.vsockCid == 0) return false;
    pids.push_back(reply.pid);
    cids.push_back(reply.vsockCid);
  }
  for (int i = 0; i < count; ++i) {
    std::string error;
    if (!agentAnswers(cids[i], 180s, error, &server.session())) {
      std::ifstream console(fmt::format("{}/{}-{}.console", dir, name, i));
      std::string log((std::istreambuf_iterator<char>(console)), std::istreambuf_iterator<char>());
      drain(&server.session(), 100ms);
      std::cerr << fmt::format("idle server fork {}: the agent did not answer: {}\nits console:\n{}\nthe "
                               "server's output:\n{}\n", i, error, log.substr(log.size() > 3000 ? log.size() - 3000 : 0),
                               server.session().output());
      // Measured without it, and counted (the lab's L1 sometimes kills a guest: docs/LAB.md).
      server.endFork(pids[i]);
      pids[i] = 0;
      result.failures++;
    }
  }
  for (auto idleUntil = Clock::now() + std::chrono::seconds(idleSeconds); Clock::now() < idleUntil;) {
    drain(&server.session(), 10ms);
    std::this_thread::sleep_for(500ms);
  }
  result.serverKib = pssKib(server.session().pid());
  std::erase(pids, 0);
  for (pid_t child : childrenOf(server.session().pid())) {
    if (std::find(pids.begin(), pids.end(), child) != pids.end()) continue;
    uint64_t spareKib = pssKib(child);
    for (pid_t grandchild : childrenOf(child)) spareKib += pssKib(grandchild);
    std::cout << fmt::format("{}: the server's spare (pid {}, with its children) PSS {} KiB, counted with the "
                             "server's\n", name, child, spareKib);
    result.serverKib += spareKib;
  }
  std::vector<uint64_t> ownKib;
  for (pid_t pid : pids) {
    uint64_t kib = pssKib(pid);
    std::vector<int> processes = {pid};
    for (pid_t child : childrenOf(pid)) {
      kib += pssKib(child);
      processes.push_back(child);
    }
    ownKib.push_back(kib);
    result.memfdMib.push_back(static_cast<double>(memfdKib(processes)) / 1024.0);
  }
  for (size_t i = 0; i < pids.size(); ++i) {
    result.mib.push_back((static_cast<double>(ownKib[i]) + static_cast<double>(result.serverKib) / pids.size()) / 1024.0);
  }
  std::cout << fmt::format("{}: the server's PSS {} KiB, split over its {} forks\n", name, result.serverKib, pids.size());
  auto sorted = ownKib;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < pids.size(); ++i) {
    if (ownKib[i] != sorted[sorted.size() / 2]) continue;
    std::cout << fmt::format("{} fork {} (median PSS {} KiB), pid {}: PSS by kind (KiB)\n", name, i, ownKib[i], pids[i]);
    for (auto& [kind, value] : pssByKind(pids[i], templateDir)) std::cout << fmt::format("  {:8} {}\n", value, kind);
    std::cout << "  largest mappings:\n";
    for (const auto& row : topMappings(pids[i], 15)) std::cout << "  " << row << "\n";
    break;
  }
  for (pid_t pid : pids) server.endFork(pid);
  server.stop();
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"clone-fork-bench"};
  std::string dir = "/tmp/clone-fork-bench";
  int forks = 100, cliForks = 20, serialForks = 10, boots = 3, qemuRestores = 5, pssForks = 20, memMib = 256,
      idleSeconds = 60;
  uint32_t cidBase = 1000;
  std::string vmm = buildBin("clone-vmm");
  app.add_option("--vmm", vmm, "the clone-vmm binary to fork with (to compare builds)");
  app.add_option("--dir", dir, "scratch directory (its unix sockets: keep it short, in /tmp)");
  app.add_option("--forks", forks, "forks timed to the agent's answer, one at a time");
  app.add_option("--cli-forks", cliForks,
                 "forks through `clone fork` (jailed, identity applied) then `clone exec -- true`, one at a time");
  int diskForks = 10;
  app.add_option("--disk-forks", diskForks,
                 "the same with a clone-block disk in the template (each fork: its own overlay and "
                 "clone-block, whose faults its core resolves); QEMU restores with a virtio-blk disk beside");
  bool diskFillUpFront = false;
  app.add_flag("--disk-fill-up-front", diskFillUpFront,
               "fork the disk template with `clone fork --disk-fill-up-front` (and its fork server "
               "with --fork-server-disks-filled-up-front): all memory filled before the disk starts, "
               "instead of the default lazy memory with the core resolving clone-block's faults");
  int pssDiskForks = 0, pssServerDiskForks = 0;
  app.add_option("--pss-server-disk-forks", pssServerDiskForks,
                 "forks of the disk template through a fork server left idle, then their PSS measured "
                 "(with their clone-blocks', plus the server's share) and their memfds' shmem");
  app.add_option("--pss-disk-forks", pssDiskForks,
                 "forks of the disk template (`clone fork`, one exec each) left idle, then the PSS of "
                 "all their processes (jailers, core, clone-block) measured");
  std::string forkMemory = "memfd";
  app.add_option("--fork-memory", forkMemory,
                 "memfd|cow: the guest memory of the forks without a disk (clone-vmm --restore and "
                 "clone fork --fork-memory)")
      ->check(CLI::IsMember({"memfd", "cow"}))
      ->capture_default_str();
  app.add_option("--serial-forks", serialForks, "forks timed to the serial console's answer");
  int pssServerForks = 20, cliServerForks = 5, serverRequestGapMs = 1000;
  app.add_option("--cli-server-forks", cliServerForks,
                 "like --cli-forks, with `clone fork --fork-server` (a jailed fork server per command)");
  int kvmStatsForks = 0;
  app.add_option("--kvm-stats-forks", kvmStatsForks,
                 "for the first N forks of each fork server, print what KVM counted for the fork's VM from "
                 "the server's reply to the agent's answer (needs debugfs at /sys/kernel/debug)");
  int traceForks = 0;
  app.add_option("--trace-forks", traceForks,
                 "for the first N forks of each fork server, switch L1's ftrace on from the request to the "
                 "agent's answer, with markers (enable the events first; /sys/kernel/tracing)");
  app.add_option("--server-request-gap-ms", serverRequestGapMs,
                 "the pause before each request to a fork server (its spare restores and prefaults meanwhile)");
  // One fork server each, its forks timed from the request to the agent's answer, one at a
  // time; the request leaves the CID to the server, as `clone fork --fork-server` does.
  struct ServerVariant {
    const char* option;
    const char* result;  // its RESULT line's name
    const char* label;
    std::vector<std::string> flags;
    int count = 20;
    Latencies forkMs;
    double readyMs = 0;
  };
  std::vector<ServerVariant> serverVariants = {
      {"--server-forks", "fork_server", "fork server", {}},
      {"--server-paused-spare-forks", "fork_server_paused_spare", "fork server, spare paused",
       {"--fork-server-spare-runs", "false"}},
      {"--server-no-prefault-forks", "fork_server_no_prefault", "fork server, spare paused, no prefault",
       {"--fork-server-spare-runs", "false", "--fork-server-prefault", "false"}},
      {"--server-no-spare-forks", "fork_server_no_spare", "fork server without a spare",
       {"--fork-server-spare", "false"}},
  };
  // Forks of the disk template through a fork server, its spares starting each fork's
  // clone-block ahead (vmm-core/api/spare_disks.h); run once that template exists.
  ServerVariant diskServer{"--server-disk-forks", "fork_server_with_disk", "fork server with a disk", {}};
  app.add_option(diskServer.option, diskServer.count,
                 "forks of the disk template through a fork server whose spares start their "
                 "clone-blocks ahead (needs --disk-forks)");
  for (auto& variant : serverVariants) {
    std::string help = variant.flags.empty()
        ? std::string("forks through one fork server (clone-vmm --fork-server-fd) with its defaults: a "
                      "spare that prefaults and runs its guest")
        : fmt::format("like --server-forks, the server started with {}", fmt::join(variant.flags, " "));
    app.add_option(variant.option, variant.count, help);
  }
  app.add_option("--pss-server-forks", pssServerForks,
                 "fork-server forks left idle, then their PSS measured (plus the server's share)");
  app.add_option("--boots", boots, "Clone cold boots timed to the agent's answer");
  app.add_option("--qemu-restores", qemuRestores, "QEMU -incoming restores timed to the serial answer");
  app.add_option("--pss-forks", pssForks, "forks left idle, then their PSS measured");
  app.add_option("--idle-seconds", idleSeconds);
  int warmProbes = 10;
  app.add_option("--warm-probes", warmProbes,
                 "probes of the running template before its snapshot: the agent's `true` and the "
                 "serial echo, the floor any fork's answer stands on in this lab");
  app.add_option("--mem-mb", memMib);
  std::string cmdlineExtra;
  app.add_option("--cmdline-extra", cmdlineExtra,
                 "appended to the guest kernel command line of the template (and of QEMU's guest)");
  app.add_option("--cid-base", cidBase, "vsock CIDs used: this one and up");
  CLI11_PARSE(app, argc, argv);
  std::cout << std::unitbuf;  // partial results survive a timeout
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::string templateDir = dir + "/template";
  std::string mem = std::to_string(memMib);
  const std::string cmdline = cmdlineExtra.empty() ? kCmdline : kCmdline + " " + cmdlineExtra;
  uint32_t nextCid = cidBase;
  auto cidArgs = [&](uint32_t cid) { return std::vector<std::string>{"--vsock-cid", std::to_string(cid)}; };
  auto with = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  // Every fork of the template without a disk.
  std::vector<std::string> restoreArgs = {"--restore", templateDir, "--fork-memory", forkMemory};
  std::vector<std::string> diskForkArgs;
  if (diskFillUpFront) diskForkArgs.push_back("--disk-fill-up-front");
  std::vector<std::string> coldBootArgs = {"--kernel", guestKernel(), "--initrd", guestInitrd(),
                                           "--cmdline", cmdline, "--mem-mb", mem};

  // The template, with its agent up (forks inherit its listening socket).
  Latencies warmExecMs, warmSerialMs;
  {
    uint32_t cid = nextCid++;
    GuestSession vm(vmm,
                    with(with(coldBootArgs, cidArgs(cid)), {"--api-socket", dir + "/template.sock"}));
    std::string error;
    if (!vm.expect("CLONE-GUEST-READY") || !answers(vm) || !agentAnswers(cid, 120s, error, &vm)) {
      std::cerr << "template did not boot or its agent did not answer: " << error << "\n" << vm.output();
      return 1;
    }
    // The floor: how fast a guest that is already running answers the same probes.
    for (int i = 0; i < warmProbes; ++i) {
      auto start = Clock::now();
      if (agentAnswers(cid, 30s, error, &vm)) warmExecMs.ms.push_back(msSince(start));
      else warmExecMs.failures++;
    }
    for (int i = 0; i < warmProbes; ++i) {
      auto start = Clock::now();
      if (answers(vm, 30s)) warmSerialMs.ms.push_back(msSince(start));
      else warmSerialMs.failures++;
    }
    auto snap = runClone({"snapshot", "--vm", dir + "/template.sock", "--output", templateDir}, 120s);
    if (!snap.ok()) {
      std::cerr << "snapshot failed\n" << snap.output;
      return 1;
    }
    std::cout << "snapshot: " << snap.output;
    powerOff(vm);
  }

  // The lab's floor for any command: starting a process that does nothing, and `clone` that
  // only prints its help. The command paths below start `clone` twice (fork, then exec).
  Latencies processStartMs, cliStartMs;
  for (int i = 0; i < warmProbes; ++i) {
    auto start = Clock::now();
    GuestSession nothing("/bin/true", {});
    nothing.closeInput();
    if (nothing.waitExit(30s) == 0) processStartMs.ms.push_back(msSince(start));
    else processStartMs.failures++;
    start = Clock::now();
    if (runClone({"--help"}, 30s).ok()) cliStartMs.ms.push_back(msSince(start));
    else cliStartMs.failures++;
  }

  // Fork latency: spawn clone-vmm --restore, until the agent ran `true`; then the fork is
  // powered off, so only one exists at a time. The first fork records the working set.
  Latencies forkMs;
  double firstForkMs = 0;
  for (int i = 0; i < forks; ++i) {
    uint32_t cid = nextCid++;
    auto start = Clock::now();
    auto spawnedAt = std::chrono::system_clock::now();
    auto session = std::make_unique<GuestSession>(vmm, with(restoreArgs, cidArgs(cid)));
    GuestSession& fork = *session;
    std::string error;
    ProbeTrace probe;
    if (!agentAnswers(cid, 120s, error, &fork, &probe)) {
      std::cerr << fmt::format("fork {}: the agent did not answer: {}\n{}\n", i, error, fork.output());
      forkMs.failures++;
      destroy(session);
      continue;
    }
    double ms = msSince(start);
    if (i == 0) firstForkMs = ms;
    else forkMs.ms.push_back(ms);
    std::cout << fmt::format("fork {}: {:.1f} ms to exec{}\n", i, ms, i == 0 && forkMemory == "memfd" ? " (records the working set)" : "");
    if (i < 4) {
      // What the fork's memory fill did (its log).
      drain(&fork, 1500ms);
      auto sinceMidnight = std::chrono::duration_cast<std::chrono::milliseconds>(spawnedAt.time_since_epoch()).count() % 86400000;
      std::cout << fmt::format("  spawned at {:02}:{:02}:{:02}.{:03} UTC (compare the log's times); the answering "
                               "connect was attempt {}, {:.1f} ms after the spawn\n",
                               sinceMidnight / 3600000, sinceMidnight / 60000 % 60, sinceMidnight / 1000 % 60,
                               sinceMidnight % 1000, probe.attempts, probe.connectedMs);
      std::istringstream log(fork.output());
      for (std::string line; std::getline(log, line);) {
        if (line.find("prefetched") != std::string::npos || line.find("working set") != std::string::npos ||
            line.find("vsock") != std::string::npos) {
          std::cout << "  " << line << "\n";
        }
      }
    }
    destroy(session);
  }

  // The same forks from one fork server: the template checked and the process started once;
  // with its spare (a fork restored ahead that the next request takes), and without.
  auto timeServerForks = [&](ServerVariant& variant, const std::vector<std::string>& serverArgs) -> bool {
    if (variant.count <= 0) return true;
    auto start = Clock::now();
    ForkServer server(vmm, with(serverArgs, variant.flags));
    if (!server.ready(60s)) {
      std::cerr << "the fork server did not start\n" << server.session().output();
      return false;
    }
    variant.readyMs = msSince(start);
    std::cout << fmt::format("{}: ready {:.1f} ms after its spawn\n", variant.label, variant.readyMs);
    for (int i = 0; i < variant.count; ++i) {
      std::string name = fmt::format("{}-{}", variant.result, i);
      // Let the spare of the previous request get ready, as it does between requests that
      // are not back to back; without a spare, the same pause.
      std::this_thread::sleep_for(std::chrono::milliseconds(serverRequestGapMs));
      drain(&server.session(), 1ms);
      TraceWindow trace(traceForks > i);
      trace.begin("clone-bench: request " + name);
      auto forkStart = Clock::now();
      auto reply = server.fork(dir, name);
      trace.mark(fmt::format("clone-bench: reply pid {}", reply.pid));
      std::map<std::string, uint64_t> kvmAtRequest;
      if (kvmStatsForks > i && reply.pid > 0) kvmAtRequest = kvmVmStats(reply.pid);
      std::string error;
      ProbeTrace probe;
      probe.trace = &trace;
      if (reply.pid <= 0 || reply.vsockCid == 0 ||
          !agentAnswers(reply.vsockCid, 120s, error, &server.session(), &probe)) {
        std::ifstream console(fmt::format("{}/{}.console", dir, name));
        std::string log((std::istreambuf_iterator<char>(console)), std::istreambuf_iterator<char>());
        std::cerr << fmt::format("{} fork {} (pid {}, CID {}): the agent did not answer: {}\nits console:\n{}\n",
                                 variant.label, i, reply.pid, reply.vsockCid, error,
                                 log.substr(log.size() > 3000 ? log.size() - 3000 : 0));
        variant.forkMs.failures++;
        trace.end("clone-bench: no answer");
      } else {
        variant.forkMs.ms.push_back(msSince(forkStart));
        trace.end("clone-bench: answered");
        std::cout << fmt::format("{} fork {}: {:.1f} ms to exec (connect attempt {}, {:.1f} ms)\n", variant.label,
                                 i, variant.forkMs.ms.back(), probe.attempts, probe.connectedMs);
        if (kvmStatsForks > i) {
          std::cout << fmt::format("  KVM counters from the reply to the answer:{}\n",
                                   kvmStatsDelta(kvmAtRequest, kvmVmStats(reply.pid)));
        }
        if (i < 4) {
          // The same connect and `true` again: what the first one paid for being first (its
          // guest's first run of that code and data since the restore).
          auto againStart = Clock::now();
          ProbeTrace again;
          if (agentAnswers(reply.vsockCid, 30s, error, &server.session(), &again)) {
            std::cout << fmt::format("  a second connect and `true`: {:.1f} ms (connect {:.1f} ms)\n",
                                     msSince(againStart), again.connectedMs);
          }
          // How long its restore took (its log).
          std::ifstream log(fmt::format("{}/{}.console", dir, name));
          for (std::string line; std::getline(log, line);) {
            if (line.find("restored from") != std::string::npos || line.find("prefault") != std::string::npos ||
                line.find("took its request") != std::string::npos) {
              std::cout << "  " << line << "\n";
            }
          }
        }
      }
      if (reply.pid > 0) server.endFork(reply.pid);
    }
    auto code = server.stop();
    // What its spares got done before their requests (the server's log).
    std::istringstream log(server.session().output());
    int shown = 0;
    for (std::string line; std::getline(log, line);) {
      bool spareLine = line.find("prefault") != std::string::npos || line.find("its guest runs") != std::string::npos;
      if (spareLine && shown++ < 20) std::cout << "  " << line << "\n";
    }
    std::cout << fmt::format("{}: exited {}\n", variant.label, code ? std::to_string(*code) : "(still running)");
    return true;
  };
  for (auto& variant : serverVariants) {
    if (!timeServerForks(variant, restoreArgs)) return 1;
  }

  // The user's path: `clone fork` (jailed core, identity applied through the agent) and then
  // `clone exec -- true`, timed from the fork command's start to exec's exit; then
  // `clone destroy`. One fork at a time.
  // `clone fork` of one fork at `socket`, then `clone exec -- true` in it. Returns the fork
  // command's output, or nullopt after printing what failed.
  auto forkAndExec = [&](const std::string& fromTemplate, const std::string& socket,
                         const std::vector<std::string>& extra) -> std::optional<std::string> {
    auto fork = runClone(with({"fork", "--template", fromTemplate, "--api-socket", socket}, extra), 180s);
    if (!fork.ok()) {
      std::cerr << "clone fork failed\n" << fork.output;
      return std::nullopt;
    }
    auto exec = runClone({"exec", "--vm", socket, "--", "true"}, 120s);
    if (!exec.ok()) {
      std::cerr << "clone exec failed\n" << exec.output;
      return std::nullopt;
    }
    return fork.output;
  };
  auto destroyFork = [&](const std::string& socket) {
    auto destroyed = runClone({"destroy", "--vm", socket}, 60s);
    if (!destroyed.ok()) {
      std::cerr << "clone destroy failed\n" << destroyed.output;
      stuckAtExit++;
    }
    return destroyed.code.value_or(-1);
  };
  auto timeCliForks = [&](const std::string& fromTemplate, int count, const std::string& name,
                          std::vector<std::string> extra = {}) {
    Latencies latencies;
    for (int i = 0; i < count; ++i) {
      std::string socket = fmt::format("{}/{}-{}.sock", dir, name, i);
      auto start = Clock::now();
      auto forkOutput = forkAndExec(fromTemplate, socket, extra);
      bool ok = forkOutput.has_value();
      double ms = msSince(start);
      if (ok) latencies.ms.push_back(ms);
      else latencies.failures++;
      std::cerr << fmt::format("progress {} {}: fork and exec done ok={} after {:.0f} ms\n", name, i, ok, ms);
      int destroyed = destroyFork(socket);
      std::cerr << fmt::format("progress {} {}: destroy exited {} after {:.0f} ms\n", name, i, destroyed, msSince(start));
      if (ok) std::cout << fmt::format("clone fork + exec ({}) {}: {:.1f} ms ({})\n", name, i, ms,
                                       forkOutput->substr(0, 160));
    }
    return latencies;
  };
  Latencies cliForkMs = timeCliForks(templateDir, cliForks, "cli", {"--fork-memory", forkMemory});
  Latencies cliServerForkMs = timeCliForks(templateDir, cliServerForks, "cli-server",
                                           {"--fork-memory", forkMemory, "--fork-server"});

  // A second template with a clone-block disk (`clone run --disk BASE,overlay`; its guest
  // probed the disk at boot, nothing mounted), snapshotted through `clone snapshot`, which
  // copies the disk; forked the same way.
  Latencies diskCliForkMs;
  ServerForkPss diskServerPss;
  std::string diskTemplateDir = dir + "/disk-template";
  std::string diskBase = dir + "/disk-base.raw";
  constexpr uint64_t kBenchDiskBytes = 64 << 20;
  if (diskForks > 0) {
    { std::ofstream(diskBase).close(); }
    std::filesystem::resize_file(diskBase, kBenchDiskBytes);
    uint32_t cid = nextCid++;
    std::string socket = dir + "/disk-template.sock";
    GuestSession vm(buildBin("clone"),
                    with(with({"run", "--no-jail"}, with(coldBootArgs, cidArgs(cid))),
                         {"--api-socket", socket, "--disk", diskBase + ",overlay"}));
    std::string error;
    if (!vm.expect("CLONE-GUEST-READY") || !answers(vm) || !agentAnswers(cid, 120s, error, &vm)) {
      std::cerr << "the disk template did not boot: " << error << "\n" << vm.output();
      return 1;
    }
    auto snap = runClone({"snapshot", "--vm", socket, "--output", diskTemplateDir}, 120s);
    if (!snap.ok()) {
      std::cerr << "snapshot with a disk failed\n" << snap.output;
      return 1;
    }
    std::cout << "snapshot with a disk: " << snap.output;
    powerOff(vm);
    diskCliForkMs = timeCliForks(diskTemplateDir, diskForks, "disk-cli", diskForkArgs);
    std::string overlays = dir + "/server-overlays";
    std::filesystem::create_directories(overlays);
    std::vector<std::string> diskServerArgs = {"--restore", diskTemplateDir, "--fork-server-block",
                                               buildBin("clone-block"), "--fork-server-overlays", overlays};
    if (diskFillUpFront) diskServerArgs.push_back("--fork-server-disks-filled-up-front");
    if (!timeServerForks(diskServer, diskServerArgs)) return 1;
    if (pssServerDiskForks > 0 && !measureServerForkPss(vmm, diskServerArgs, dir, "pss-server-disk", pssServerDiskForks,
                                                        idleSeconds, diskTemplateDir, diskServerPss)) {
      return 1;
    }
    std::filesystem::remove_all(overlays);
  }

  // Private memory of idle forks with a disk: every process of each fork (its jailers, its
  // core, its clone-block), whose names all carry the fork's socket name.
  std::vector<double> diskPssMib, diskMemfdMib;
  if (diskForks > 0 && pssDiskForks > 0) {
    std::vector<std::string> sockets;
    for (int i = 0; i < pssDiskForks; ++i) {
      sockets.push_back(fmt::format("{}/pssdisk-{}.sock", dir, i));
      if (!forkAndExec(diskTemplateDir, sockets.back(), diskForkArgs)) {
        std::cerr << fmt::format("idle disk fork {} did not start or answer\n", i);
        return 1;
      }
    }
    std::this_thread::sleep_for(std::chrono::seconds(idleSeconds));
    for (int i = 0; i < pssDiskForks; ++i) {
      uint64_t kib = 0;
      std::vector<std::string> parts;
      auto pids = pidsWithArgument(fmt::format("{}/pssdisk-{}.", dir, i));
      diskMemfdMib.push_back(static_cast<double>(memfdKib(pids)) / 1024.0);
      for (int pid : pids) {
        uint64_t one = pssKib(pid);
        kib += one;
        std::ifstream comm(fmt::format("/proc/{}/comm", pid));
        std::string name;
        std::getline(comm, name);
        parts.push_back(fmt::format("{} {} KiB", name, one));
      }
      diskPssMib.push_back(static_cast<double>(kib) / 1024.0);
      std::cout << fmt::format("idle disk fork {}: {:.2f} MiB ({}); its memfd holds {:.2f} MiB\n", i, kib / 1024.0,
                               fmt::join(parts, ", "), diskMemfdMib.back());
    }
    for (const auto& socket : sockets) destroyFork(socket);
  }

  Latencies forkSerialMs;
  for (int i = 0; i < serialForks; ++i) {
    auto start = Clock::now();
    auto session = std::make_unique<GuestSession>(vmm, with(restoreArgs, cidArgs(nextCid++)));
    bool answered = answers(*session);
    if (answered) forkSerialMs.ms.push_back(msSince(start));
    else std::cerr << "fork did not answer on its console\n" << session->output();
    forkSerialMs.failures += answered ? 0 : 1;
    destroy(session);
    if (!answered) continue;
    std::cout << fmt::format("fork (serial) {}: {:.1f} ms\n", i, forkSerialMs.ms.back());
  }

  // Clone cold boot to the same agent answer.
  Latencies bootMs;
  for (int i = 0; i < boots; ++i) {
    uint32_t cid = nextCid++;
    auto start = Clock::now();
    auto session = std::make_unique<GuestSession>(vmm, with(coldBootArgs, cidArgs(cid)));
    std::string error;
    bool answered = agentAnswers(cid, 180s, error, session.get());
    if (answered) bootMs.ms.push_back(msSince(start));
    else std::cerr << "cold boot: the agent did not answer: " << error << "\n" << session->output();
    bootMs.failures += answered ? 0 : 1;
    destroy(session);
    if (!answered) continue;
    std::cout << fmt::format("clone cold boot {}: {:.1f} ms to exec\n", i, bootMs.ms.back());
  }

  // QEMU: boot, migrate to a file, then restore from it (`extra`: its devices, the same for
  // the boot and the restores).
  std::vector<std::string> qemu = {"-accel", "kvm", "-M", "q35", "-cpu", "host", "-m", mem,
                                   "-smp", "1", "-nodefaults", "-nographic", "-no-reboot",
                                   "-serial", "stdio", "-kernel", guestKernel(), "-initrd",
                                   guestInitrd(), "-append", cmdline};
  auto timeQemuRestores = [&](const std::vector<std::string>& extra, const std::string& name, int count) {
    Latencies latencies;
    std::string monitor = fmt::format("{}/qemu-{}.monitor", dir, name);
    std::string stateFile = fmt::format("{}/qemu-{}.migration", dir, name);
    if (count <= 0) return latencies;
    {
      GuestSession vm("/usr/bin/qemu-system-x86_64",
                      with(with(qemu, extra), {"-monitor", "unix:" + monitor + ",server=on,wait=off"}));
      if (!vm.expect("CLONE-GUEST-READY") || !answers(vm)) {
        std::cerr << "QEMU (" << name << ") did not boot\n" << vm.output();
        return latencies;
      }
      hmp(monitor, "migrate \"exec:cat > " + stateFile + "\"");
      bool done = false;
      for (int i = 0; i < 120 && !done; ++i) {
        done = hmp(monitor, "info migrate").find("completed") != std::string::npos;
      }
      hmp(monitor, "quit");
      vm.waitExit(20s);
      if (!done) {
        std::cerr << "QEMU (" << name << ") migration to a file did not complete\n";
        return latencies;
      }
      std::cout << fmt::format("QEMU ({}) migration file: {} MiB\n", name,
                               std::filesystem::file_size(stateFile) >> 20);
    }
    for (int i = 0; i < count; ++i) {
      auto start = Clock::now();
      GuestSession vm("/usr/bin/qemu-system-x86_64", with(with(qemu, extra), {"-incoming", "exec:cat " + stateFile}));
      if (!answers(vm)) {
        std::cerr << "QEMU (" << name << ") restore did not answer\n" << vm.output();
        latencies.failures++;
        continue;
      }
      latencies.ms.push_back(msSince(start));
      std::cout << fmt::format("qemu restore ({}) {}: {:.1f} ms to serial answer\n", name, i,
                               latencies.ms.back());
    }
    return latencies;
  };
  Latencies qemuMs = timeQemuRestores({}, "plain", qemuRestores);
  // The same guest with a virtio-blk disk on a raw file of the same size (snapshot=on: the
  // restores share the boot's image, unwritten).
  Latencies qemuDiskMs;
  if (diskForks > 0) {
    std::string qemuDisk = dir + "/qemu-disk.raw";
    { std::ofstream(qemuDisk).close(); }
    std::filesystem::resize_file(qemuDisk, kBenchDiskBytes);
    qemuDiskMs = timeQemuRestores({"-drive", "file=" + qemuDisk + ",if=virtio,format=raw,snapshot=on"},
                                  "disk", qemuRestores);
  }

  // Private memory of idle forks, each asked once through its agent.
  std::vector<double> pssMib;
  std::vector<std::map<std::string, uint64_t>> breakdowns;
  std::vector<int> threads;
  std::vector<double> identicalKib, differingKib;
  if (pssForks > 0) {
    std::vector<std::unique_ptr<GuestSession>> idle;
    std::vector<uint32_t> cids;
    for (int i = 0; i < pssForks; ++i) {
      cids.push_back(nextCid++);
      idle.push_back(std::make_unique<GuestSession>(
          vmm,
          with(with(restoreArgs, {"--api-socket", fmt::format("{}/pss-{}.sock", dir, i)}),
               cidArgs(cids.back()))));
    }
    for (int i = 0; i < pssForks; ++i) {
      std::string error;
      if (!agentAnswers(cids[i], 180s, error, idle[i].get())) {
        std::cerr << fmt::format("idle fork {}: the agent did not answer: {}\n", i, error);
        return 1;
      }
    }
    for (auto idleUntil = Clock::now() + std::chrono::seconds(idleSeconds); Clock::now() < idleUntil;) {
      for (auto& vm : idle) drain(vm.get(), 10ms);
      std::this_thread::sleep_for(500ms);
    }
    for (int i = 0; i < pssForks; ++i) {
      uint64_t kib = 0;
      std::map<std::string, uint64_t> kinds;
      int forkThreads = 0;
      // Every process of the fork: only clone-vmm so far (no device processes).
      for (int pid : pidsWithArgument(fmt::format("{}/pss-{}.sock", dir, i))) {
        kib += pssKib(pid);
        for (auto& [kind, value] : pssByKind(pid, templateDir)) kinds[kind] += value;
        forkThreads += threadCount(pid);
        if (forkMemory == "memfd") {  // a cow fork has no memfd: ownedGuestPagesByKind covers it
          auto pages = templatePagesOf(pid, templateDir + "/memory");
          identicalKib.push_back(static_cast<double>(pages.identical * 4));
          differingKib.push_back(static_cast<double>((pages.resident - pages.identical) * 4));
        }
      }
      pssMib.push_back(static_cast<double>(kib) / 1024.0);
      breakdowns.push_back(std::move(kinds));
      threads.push_back(forkThreads);
    }
    // Where the memory of the fork with the median PSS goes, mapping by mapping.
    size_t median = 0;
    for (size_t i = 0; i < pssMib.size(); ++i) {
      if (pssMib[i] == percentile(pssMib, 0.5)) median = i;
    }
    for (int pid : pidsWithArgument(fmt::format("{}/pss-{}.sock", dir, median))) {
      std::cout << fmt::format("fork {} (median PSS), pid {}: largest mappings by PSS (KiB)\n", median, pid);
      for (const auto& row : topMappings(pid, 15)) std::cout << "  " << row << "\n";
      if (forkMemory == "cow") {
        std::cout << fmt::format("fork {}: the guest pages it owns, by the guest kernel's page flags (KiB)\n", median);
        for (const auto& [kind, kib] : ownedGuestPagesByKind(pid, templateDir + "/memory",
                                                            fmt::format("{}/pss-{}.sock", dir, median),
                                                            static_cast<uint64_t>(memMib) << 20)) {
          std::cout << fmt::format("  {:8} {}\n", kib, kind);
        }
      }
    }
    for (auto& vm : idle) destroy(vm);
  }

  // Private memory of idle forks of one fork server: each fork's own PSS plus its share of the
  // server's (which exists for them).
  ServerForkPss serverPss;
  if (pssServerForks > 0 && !measureServerForkPss(vmm, restoreArgs, dir, "pss-server", pssServerForks, idleSeconds,
                                                  templateDir, serverPss)) {
    return 1;
  }

  std::cout << fmt::format("RESULT fork_memory {} (the forks without a disk)\n", forkMemory);
  std::cout << fmt::format("RESULT clone_fork_to_exec_ms {} (first fork, which records the working set: {:.1f})\n",
                           describe(forkMs), firstForkMs);
  std::cout << fmt::format("RESULT clone_fork_command_to_exec_ms {} (clone fork, jailed, identity applied, then clone exec)\n",
                           describe(cliForkMs));
  std::cout << fmt::format("RESULT clone_fork_to_serial_ms {}\n", describe(forkSerialMs));
  for (const auto& variant : serverVariants) {
    if (variant.count <= 0) continue;
    std::cout << fmt::format("RESULT {}_fork_to_exec_ms {} (request to a running fork server{}, {} ms after the "
                             "previous fork; the server was ready {:.1f} ms after its spawn)\n",
                             variant.result, describe(variant.forkMs),
                             variant.flags.empty() ? " with its defaults" : " started with " + fmt::format("{}", fmt::join(variant.flags, " ")),
                             serverRequestGapMs, variant.readyMs);
  }
  std::cout << fmt::format("RESULT clone_cold_boot_to_exec_ms {}\n", describe(bootMs));
  std::cout << fmt::format("RESULT template_running_exec_ms {} (the same exec probe, the template before its "
                           "snapshot: no VMM start, no restore)\n", describe(warmExecMs));
  std::cout << fmt::format("RESULT template_running_serial_ms {} (QEMU's serial probe, the same running template)\n",
                           describe(warmSerialMs));
  std::cout << fmt::format("RESULT qemu_restore_to_serial_ms {}\n", describe(qemuMs));
  std::cout << fmt::format("RESULT process_start_ms {} (/bin/true, spawned and waited for as the bench "
                           "runs every command)\n", describe(processStartMs));
  std::cout << fmt::format("RESULT clone_cli_start_ms {} (clone --help)\n", describe(cliStartMs));
  if (!qemuMs.ms.empty() && !processStartMs.ms.empty()) {
    std::cout << fmt::format("RESULT note 1/20 of QEMU's restore is {:.1f} ms p50; starting one process "
                             "that does nothing takes {:.1f} ms p50 here\n",
                             qemuMs.p(0.5) / 20, processStartMs.p(0.5));
  }
  auto ratio = [](const Latencies& a, const Latencies& b, double q) {
    return a.ms.empty() || b.ms.empty() ? 0.0 : a.p(q) / b.p(q);
  };
  std::cout << fmt::format("RESULT ratio qemu_restore(serial)/clone_fork(exec) p50 {:.2f} p99 {:.2f} (goal >= 20)\n",
                           ratio(qemuMs, forkMs, 0.5), ratio(qemuMs, forkMs, 0.99));
  if (cliServerForks > 0) {
    std::cout << fmt::format("RESULT clone_fork_server_command_to_exec_ms {} (clone fork --fork-server, jailed, "
                             "identity applied, then clone exec)\n", describe(cliServerForkMs));
    std::cout << fmt::format("RESULT ratio qemu_restore(serial)/clone_fork_server_command(exec) p50 {:.2f} p99 {:.2f}\n",
                             ratio(qemuMs, cliServerForkMs, 0.5), ratio(qemuMs, cliServerForkMs, 0.99));
  }
  for (const auto& variant : serverVariants) {
    if (variant.count <= 0) continue;
    std::cout << fmt::format("RESULT ratio qemu_restore(serial)/{}_fork(exec) p50 {:.2f} p99 {:.2f}{}\n", variant.result,
                             ratio(qemuMs, variant.forkMs, 0.5), ratio(qemuMs, variant.forkMs, 0.99),
                             variant.flags.empty() ? " (goal >= 20)" : "");
  }
  std::cout << fmt::format("RESULT ratio qemu_restore(serial)/clone_fork_command(exec) p50 {:.2f} p99 {:.2f}\n",
                           ratio(qemuMs, cliForkMs, 0.5), ratio(qemuMs, cliForkMs, 0.99));
  std::cout << fmt::format("RESULT ratio qemu_restore(serial)/clone_fork(serial) p50 {:.2f} p99 {:.2f}\n",
                           ratio(qemuMs, forkSerialMs, 0.5), ratio(qemuMs, forkSerialMs, 0.99));
  std::cout << fmt::format("RESULT ratio qemu_restore(serial)/template_running(exec) p50 {:.2f}, "
                           "qemu_restore(serial)/template_running(serial) p50 {:.2f} (the most any fork could "
                           "reach in this lab: a restore that took no time)\n",
                           ratio(qemuMs, warmExecMs, 0.5), ratio(qemuMs, warmSerialMs, 0.5));
  std::cout << fmt::format("RESULT ratio clone_cold_boot(exec)/clone_fork(exec) p50 {:.2f}\n",
                           ratio(bootMs, forkMs, 0.5));
  std::cout << fmt::format("RESULT vms_stuck_at_exit {}\n", stuckAtExit);
  if (diskForks > 0) {
    std::cout << fmt::format("RESULT clone_fork_command_with_disk_to_exec_ms {} (as above, the template has a "
                             "clone-block disk: an overlay and a jailed clone-block per fork, {})\n", describe(diskCliForkMs),
                             diskFillUpFront ? "memory filled up front" : "postcopy");
    std::cout << fmt::format("RESULT qemu_restore_with_disk_to_serial_ms {}\n", describe(qemuDiskMs));
    std::cout << fmt::format("RESULT ratio qemu_restore_with_disk(serial)/clone_fork_command_with_disk(exec) "
                             "p50 {:.2f} p99 {:.2f}\n",
                             ratio(qemuDiskMs, diskCliForkMs, 0.5), ratio(qemuDiskMs, diskCliForkMs, 0.99));
    std::cout << fmt::format("RESULT ratio clone_fork_command_with_disk/clone_fork_command (cost of the disk) "
                             "p50 {:.2f}\n", ratio(diskCliForkMs, cliForkMs, 0.5));
    if (diskServer.count > 0) {
      std::cout << fmt::format("RESULT fork_server_with_disk_fork_to_exec_ms {} (request to a running fork server "
                               "of the disk template, its spare's clone-block started ahead, {}, {} ms after the "
                               "previous fork; the server was ready {:.1f} ms after its spawn)\n",
                               describe(diskServer.forkMs), diskFillUpFront ? "memory filled up front" : "postcopy",
                               serverRequestGapMs, diskServer.readyMs);
      std::cout << fmt::format("RESULT ratio qemu_restore_with_disk(serial)/fork_server_with_disk_fork(exec) "
                               "p50 {:.2f} p99 {:.2f} (goal >= 20)\n",
                               ratio(qemuDiskMs, diskServer.forkMs, 0.5), ratio(qemuDiskMs, diskServer.forkMs, 0.99));
    }
  }
  if (!diskPssMib.empty()) {
    std::cout << fmt::format("RESULT fork_with_disk_pss_mib {} (idle {} s, every process of the fork)\n",
                             describeMib(diskPssMib), idleSeconds);
    std::cout << fmt::format("RESULT fork_with_disk_memfd_mib {} (the same forks: the shmem their guest memory "
                             "holds, mapped or not; PSS misses what no process maps)\n",
                             describeMib(diskMemfdMib));
  }
  if (!serverPss.mib.empty()) {
    std::cout << fmt::format("RESULT fork_server_fork_pss_mib {} (idle {} s, each fork's PSS plus 1/n of the "
                             "server's {} KiB; {} forks did not answer; goal <= 2 MB)\n",
                             describeMib(serverPss.mib), idleSeconds, serverPss.serverKib, serverPss.failures);
  }
  if (!diskServerPss.mib.empty()) {
    std::cout << fmt::format("RESULT fork_server_with_disk_fork_pss_mib {} (idle {} s, each fork's PSS with its "
                             "clone-block's plus 1/n of the server's {} KiB, {}; {} forks did not answer)\n",
                             describeMib(diskServerPss.mib), idleSeconds, diskServerPss.serverKib,
                             diskFillUpFront ? "memory filled up front" : "postcopy", diskServerPss.failures);
    std::cout << fmt::format("RESULT fork_server_with_disk_fork_memfd_mib {} (the same forks' memfd shmem, mapped "
                             "or not)\n", describeMib(diskServerPss.memfdMib));
  }
  if (!pssMib.empty()) {
    std::cout << fmt::format("RESULT fork_pss_mib {} (idle {} s, goal <= 2 MB)\n", describeMib(pssMib), idleSeconds);
    // Where it goes: the median of each kind over the forks.
    std::map<std::string, std::vector<double>> byKind;
    for (const auto& b : breakdowns) {
      for (const auto& [kind, kib] : b) byKind[kind].push_back(static_cast<double>(kib));
    }
    for (const auto& [kind, values] : byKind) {
      std::cout << fmt::format("RESULT fork_pss_kib {:<40} median {:8.0f}\n", kind, percentile(values, 0.5));
    }
    std::cout << fmt::format("RESULT fork_threads median {}\n",
                             percentile(std::vector<double>(threads.begin(), threads.end()), 0.5));
    // What sharing the template's clean pages copy-on-write would leave private.
    if (!identicalKib.empty()) std::cout << fmt::format("RESULT fork_guest_kib identical to the template median {:.0f}, differing median "
                             "{:.0f} (resident memfd pages; identical ones a copy-on-write mapping could share)\n",
                             percentile(identicalKib, 0.5), percentile(differingKib, 0.5));
  }
  return 0;
}
