#include "tests/support/process_report.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <sstream>
#include <thread>
#include <vector>

#include <fmt/format.h>

namespace clonevm::e2e {
namespace {

std::string readWhole(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string oneLine(std::string text) {
  std::replace(text.begin(), text.end(), '\0', ' ');
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

// "comm (state)" from /proc/PID/task/TID/stat: the state follows the parenthesised name.
std::string threadState(const std::filesystem::path& task) {
  std::string stat = readWhole(task / "stat");
  auto close = stat.rfind(')');
  auto open = stat.find('(');
  if (open == std::string::npos || close == std::string::npos || close + 2 >= stat.size()) return "?";
  return fmt::format("{} {}", stat.substr(open + 1, close - open - 1), stat[close + 2]);
}

bool isPid(const std::filesystem::path& path) {
  const std::string name = path.filename();
  return !name.empty() && std::all_of(name.begin(), name.end(), ::isdigit);
}

std::string describeThread(const std::filesystem::path& task) {
  std::string report = fmt::format("  thread {} {} wchan={}\n", task.filename().string(),
                                   threadState(task), oneLine(readWhole(task / "wchan")));
  std::istringstream frames(readWhole(task / "stack"));
  for (std::string frame; std::getline(frames, frame);) report += "    " + frame + "\n";
  return report;
}

// Calls visit(pid, cmdline, threads) for every process whose command line contains `text`
// ("" matches all); processes and threads that end meanwhile are skipped.
template <typename Visit>
void forEachProcess(const std::string& text, Visit visit) {
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    if (!isPid(entry.path())) continue;
    std::string cmdline = oneLine(readWhole(entry.path() / "cmdline"));
    if (cmdline.find(text) == std::string::npos) continue;
    std::vector<std::filesystem::path> threads;
    std::error_code taskError;
    for (const auto& task : std::filesystem::directory_iterator(entry.path() / "task", taskError)) {
      threads.push_back(task.path());
    }
    visit(entry.path().filename().string(), cmdline, threads);
  }
}

}  // namespace

std::string describeProcessesMatching(const std::string& text) {
  std::string report;
  forEachProcess(text, [&](const std::string& pid, const std::string& cmdline, const auto& threads) {
    report += fmt::format("process {}: {}\n", pid, cmdline);
    for (const auto& thread : threads) report += describeThread(thread);
  });
  return report;
}

std::string describeThreadsWaitingIn(const std::string& wchan) {
  std::string report;
  forEachProcess("", [&](const std::string& pid, const std::string& cmdline, const auto& threads) {
    for (const auto& thread : threads) {
      if (oneLine(readWhole(thread / "wchan")) != wchan) continue;
      report += fmt::format("process {} ({}):\n", pid, cmdline) + describeThread(thread);
    }
  });
  return report;
}

FileMappingUsage fileMappingUsage(const std::string& text, const std::string& path) {
  FileMappingUsage usage;
  // Matched by inode: a jailed process's smaps may name the file by another path.
  struct stat file {};
  if (::stat(path.c_str(), &file) != 0) return usage;
  std::string inodeText = std::to_string(file.st_ino);
  forEachProcess(text, [&](const std::string& pid, const std::string&, const auto&) {
    std::istringstream smaps(readWhole(std::filesystem::path("/proc") / pid / "smaps"));
    bool inFile = false;
    for (std::string line; std::getline(smaps, line);) {
      std::istringstream fields(line);
      std::string first, second;
      fields >> first >> second;
      if (!first.empty() && first.back() != ':') {  // a mapping's header: "from-to perms ... name"
        std::string offset, device, inode, name;
        fields >> offset >> device >> inode;
        std::getline(fields >> std::ws, name);
        inFile = inode == inodeText && !name.empty() &&
                 std::filesystem::path(name).filename() == std::filesystem::path(path).filename();
        usage.mappings += inFile ? 1 : 0;
        continue;
      }
      if (!inFile) continue;
      uint64_t kib = std::strtoull(second.c_str(), nullptr, 10);
      if (first == "Rss:") usage.rss += kib;
      if (first == "Shared_Clean:" || first == "Shared_Dirty:") usage.shared += kib;
      if (first == "Anonymous:") usage.anonymous += kib;
    }
  });
  return usage;
}

uint64_t anonymousKib(const std::string& text) {
  uint64_t kib = 0;
  forEachProcess(text, [&](const std::string& pid, const std::string&, const auto&) {
    std::istringstream rollup(readWhole(std::filesystem::path("/proc") / pid / "smaps_rollup"));
    for (std::string key, value; rollup >> key;) {
      if (key == "Anonymous:" && rollup >> value) kib += std::strtoull(value.c_str(), nullptr, 10);
    }
  });
  return kib;
}

std::vector<std::string> jailRootsOfProcessesMatching(const std::string& text) {
  std::vector<std::string> roots;
  struct stat host {};
  if (::stat("/", &host) != 0) return roots;
  forEachProcess(text, [&](const std::string& pid, const std::string&, const auto&) {
    std::string root = "/proc/" + pid + "/root";
    struct stat st {};
    if (::stat(root.c_str(), &st) == 0 && (st.st_dev != host.st_dev || st.st_ino != host.st_ino)) {
      roots.push_back(root);
    }
  });
  return roots;
}

namespace {

bool writeFile(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.flush();
  return out.good();
}

// Threads named vcpuN of the processes whose command line contains `text`.
std::vector<std::string> vcpuThreads(const std::string& text) {
  std::vector<std::string> tids;
  forEachProcess(text, [&](const std::string&, const std::string&, const auto& threads) {
    for (const auto& thread : threads) {
      if (readWhole(thread / "comm").starts_with("vcpu")) tids.push_back(thread.filename());
    }
  });
  return tids;
}

}  // namespace

std::string traceKvmOfProcessesMatching(const std::string& text, std::chrono::milliseconds window,
                                        size_t lines) {
  const std::filesystem::path tracing = "/sys/kernel/tracing";
  static const char* const kEvents[] = {"kvm_exit", "kvm_page_fault", "kvm_inj_exception",
                                        "kvm_mmio", "kvm_emulate_insn", "kvm_userspace_exit"};
  auto tids = vcpuThreads(text);
  if (tids.empty()) return "(no vCPU thread to trace)\n";
  if (::geteuid() != 0 || !std::filesystem::exists(tracing / "events/kvm/kvm_exit/enable")) {
    return "(no KVM trace: needs root and tracefs at /sys/kernel/tracing)\n";
  }
  std::string pids;
  for (const auto& tid : tids) pids += tid + " ";
  bool ready = writeFile(tracing / "tracing_on", "0") && writeFile(tracing / "trace", "") &&
               writeFile(tracing / "set_event_pid", pids);
  for (const char* event : kEvents) {
    ready = ready && writeFile(tracing / "events/kvm" / event / "enable", "1");
  }
  std::string trace;
  if (ready) {
    writeFile(tracing / "tracing_on", "1");
    std::this_thread::sleep_for(window);
    writeFile(tracing / "tracing_on", "0");
    trace = readWhole(tracing / "trace");
  }
  for (const char* event : kEvents) writeFile(tracing / "events/kvm" / event / "enable", "0");
  writeFile(tracing / "set_event_pid", "");
  writeFile(tracing / "trace", "");
  if (!ready) return "(no KVM trace: tracefs refused the setup)\n";
  std::map<std::string, size_t> counts;
  std::string first;
  size_t kept = 0;
  std::istringstream in(trace);
  static const std::regex eventName(R"(\s(kvm_\w+):)");
  for (std::string line; std::getline(in, line);) {
    std::smatch match;
    if (line.starts_with("#") || !std::regex_search(line, match, eventName)) continue;
    counts[match[1]]++;
    if (kept++ < lines) first += "    " + line + "\n";
  }
  std::string report = fmt::format("KVM events of vCPU thread(s) {}in {} ms:", pids, window.count());
  for (const auto& [event, count] : counts) report += fmt::format(" {} {}", event, count);
  return report + (counts.empty() ? " none\n" : "\n") + first;
}

std::string describeStuckVm(const std::string& text) {
  return "--- its processes:\n" + describeProcessesMatching(text) +
         "--- host threads waiting for a userfaultfd fill:\n" +
         describeThreadsWaitingIn("handle_userfault") + "--- " +
         traceKvmOfProcessesMatching(text, std::chrono::seconds(1));
}

std::string fileTail(const std::string& path, size_t lines) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fmt::format("({}: cannot read)\n", path);
  std::vector<std::string> all;
  for (std::string line; std::getline(in, line);) all.push_back(line);
  std::string tail;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) {
    tail += all[i] + "\n";
  }
  return tail;
}

}  // namespace clonevm::e2e
